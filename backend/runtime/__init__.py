"""BLIP on OpenVINO, without torch: a model directory built by `blip-build` -> captions, answers and
ranked choices for batches of images.

    blip        Blip: the compiled parts and the decoding calls
    generate    greedy and beam search over a numpy decoding step
    preprocess  images -> pixel values, text <-> token ids
    manifest    the model directory's contract with model_build (files, hashes, settings, model_version)
    memory      freed memory back to the system, weight files' pages given back after the warm-up; RSS
    env         numbers from the environment, with an error that names the variable

Imports nothing else of this project: model_build and bench use it as it is.
"""
