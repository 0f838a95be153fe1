"""What must never differ between training, prediction and evaluation, one concern per
module. Each module imports only those above it in this list:

    runtime      argument types, the device, output folders, atomic writes, safe names
    imagefiles   a path -> an 8-bit grey image (every format, DICOM, the refusals)
    scan         the image files of a folder, and what was skipped
    dataset      labelled folders, patient ids, patient-grouped splits, decoded arrays
    network      class names, preprocessing, MobileNetV2, the one inference path
    scoring      the one metrics module: decisions, accuracy / AUC, ECE, bootstrap
    calib        temperature, sensitivity threshold and uncertain band
    checkpoints  a state_dict plus plain metadata, every field checked at load; ensembles
    siteshift    typicality (the out-of-distribution flag), shift check, AdaBN
    recipes      the training recipes as data (reference, improved, ablations), in words
    runstate     a training run's folder, resumable state, Ctrl-C, torchrun processes
    runfiles     what a training run writes: split file, test report, checkpoint, plot
    engine       training's parts around the loop: splits, loader, model, optimiser

Functions raise exceptions; only the scripts turn them into one-line messages, and the
modules of a training run (recipes to engine), which stop it with one line (SystemExit).
"""
