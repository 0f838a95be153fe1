"""What must never differ between training, prediction and evaluation, one concern per
module. Each module imports only those above it in this list:

    runtime      argument types, the device, output folders and whether they can be
                 written, atomic writes, safe names
    imagefiles   a path -> an 8-bit grey image (every format, DICOM, the refusals)
    scan         the image files of a folder, and what was skipped
    network      class names, preprocessing, MobileNetV2, the one inference path
    dataset      labelled folders, patient ids, patient-grouped splits, decoded arrays
    evalfiles    the labelled images an evaluation reads (a folder, or a run's
                 val_split.csv read back) and whether its outputs can be written
    scoring      the one metrics module: decisions, accuracy / AUC, ECE, bootstrap
    assess       every number of an evaluation on labelled images (metrics at both
                 thresholds with intervals, calibration check, errors, coverage, the
                 risk-coverage curve and AURC, the referral rule's promise against what
                 was measured, and against referring the least confident)
    selective    the referral rule: the confidence cut with a guaranteed risk (SGR)
    calib        the Calibration: temperature(s), sensitivity threshold and referral rule,
                 fitted, applied, decided on and stored (no other module reads its fields)
    checkpoints  a state_dict plus plain metadata, every field checked at load; ensemble
                 files (members and one calibration), loaded the same way
    siteshift    typicality (the atypical flag), shift check, AdaBN
    intake       the files given to predict: each once, decoded in workers, errors as values
    predtable    the prediction tables: predict's rows, run manifest, --resume; evaluation rows
    predconsole  what predict prints: per film (verdict, answer or refer and why), per batch
    siteprotocol the site protocols: AdaBN of the members, a labelled folder's shift
                 report, cross-fitted local recalibration, the model calibrated on K
                 images of the site
    recipes      the training recipes as data (reference, improved, ablations), in words
    runstate     a training run's folder, resumable state, Ctrl-C, torchrun processes
    runfiles     what a training run writes: split file, test report, checkpoint, plot
    engine       training's parts around the loop: splits, loader, model, optimiser

Functions raise exceptions; only the scripts turn them into one-line messages, and the
modules of a training run (recipes to engine), which stop it with one line (SystemExit).
"""
