"""The base every specmoe stage stands on (tracing, estimators, runtime).

    specmoe.families            what differs between MoE families, in memory and on disk
    specmoe.models              loading a Hugging Face MoE model (config, whole model)
    specmoe.corpus, .tokens     text datasets and fixed-length token rows
    specmoe.errors              the one error type a user sees, and the command wrapper
    specmoe.format_json,
    specmoe.safetensors_stream  versioned JSON and atomic safetensors files

A stage imports this package and the other stages' public names only.
"""
