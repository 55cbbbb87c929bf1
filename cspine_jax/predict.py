r"""Fracture probabilities for raw DICOM series: localize the vertebrae, classify each one.

  python -m cspine_jax.predict --classifier=RUNS/demo --localizer=RUNS/localizer \
      --dicom=/data/rsna/test_images/1.2.826... --output=OUT [--dicom_outputs]
  python -m cspine_jax.predict ... --dicom=/data/rsna/test_images --output=OUT   (batch)
  python -m cspine_jax.predict ... --data=CONVERTED --output=OUT                   (batch)

One series (a --dicom folder holding .dcm files, or no sub-folder at all) writes
  OUT/prediction.json  {"assessable": true, "not_assessable_reason": null,
                        "probabilities": {"patient_overall": p, "C1": p, ... "C7": p},
                        "not_assessed": {"C7": "the localizer found no C7"},
                        "vertebrae": {"C1": {"box_voxel": [z0, y0, x0, z1, y1, x1],
                                             "box_lps_mm": [[min L, P, S], [max L, P, S]],
                                             "center_lps_mm": [...], "probability": p}, ...},
                        "volume": {shape, spacing_mm, origin, direction, slices},
                        "checkpoints": {"classifier": step, "localizer": step},
                        "calibration": "applied" | "none",
                        "timings_s": {stage: seconds, ..., "total": s}, "warnings": [...]}
  ("applied": CLASSIFIER/calibration.json, fitted on that checkpoint by `python -m
  cspine_jax.calibrate`, set the probabilities, as eval applies it; patient_overall is then at
  least its largest found vertebra's)
  OUT/overlay.png      sagittal and coronal views through the spine, vertebrae coloured and
                       labelled with their probabilities, the patient probability in the title
  OUT/seg.dcm, OUT/sr.dcm   with --dicom_outputs: the vertebra mask as a DICOM SEG (none when
                       no vertebra is found) and the probabilities as a DICOM SR
                       (`cspine_jax.dicom_outputs`; --threshold is the fracture decision
                       threshold the SR states)

Batch: a --dicom folder of study folders (Kaggle's test_images/<UID>/ layout, or an RSNA root
with train_images/ and/or test_images/: the studies `data_tools.convert.discover` finds, so both
commands agree on what a study folder is), or --data=CONVERTED (every study of a converted
dataset's manifest, from its volumes: no DICOM read). Both models are loaded and compiled once
(`Predictor`), and the next study is read while they work on this one (each prediction.json's
timings are still the study's own: its read, the rest, and a ``total`` of both; there is no
``load_models``). A tqdm bar on stderr (--noprogress: none), and a last line with studies/min.
Writes
  OUT/<study>/         the files above for each study, <study> its folder name (or manifest uid)
  OUT/submission.csv   Kaggle's row_id,fractured: <study>_<target> for every predicted study and
                       target (null probabilities filled with SUBMISSION_FALLBACK, see there)
  OUT/failures.jsonl   {"study": ..., "error": ...} per study that failed (empty when none)
A study's files go to a temporary folder renamed into place when complete, then its record to
OUT/.predict/<study>.json: a rerun skips studies whose record names the same models and options
(and whose files are there), retries failed ones, and rebuilds submission.csv and failures.jsonl
from every study of the input. A bad study (corrupt file, MR series, gap in z) is recorded and
the batch goes on; the command then exits 1 with `error: N of M studies failed (see
OUT/failures.jsonl)` as its last line, after finishing the others. A study folder whose name is
not a DICOM UID (it may be a patient's name) is failed by its position only, as the converter
does ("study folder #2 of --dicom"), under the converter's stand-in "invalid-folder-<split>-<n>":
its name reaches no output, path or message. Nothing read from DICOM tags names anything.

Vertebrae the localizer does not find. A vertebra without a box was never seen by the classifier
(its crop would be empty), so it gets no probability: ``probabilities[name]`` is null and
``not_assessed[name]`` says why; every null in ``probabilities`` has its reason there, and
``vertebrae`` lists the found ones only. A radiologist reading "C7 0.03" takes it as "C7 looked
at, no fracture"; a number for a level nobody looked at (C7 behind the shoulders and C1 at a cut
skull base are the usual ones) would be a false reassurance, and an imputed prior is a number
the scan did not give. So:
- some found: the found vertebrae keep their probabilities; ``patient_overall`` is still the
  model's patient output (what a worklist is sorted by) and is reported, with a warning that it
  rests on the vertebrae found only, naming the ones not assessed, which the reader has to
  review; the console line and the overlay name them too. (With a noisy-OR or max patient head
  the empty crops still enter that combination at the model's answer to an empty crop, near the
  training prior: one more reason to read it as "of the levels seen".)
- none found (not a neck CT, the neck outside the field of view, or a localizer failure): the
  study is not assessable: ``"assessable": false``, ``not_assessable_reason`` says why, every
  probability is null (``patient_overall`` too: a patient score with no vertebra seen is the
  model's answer to empty crops) and the classifier is not run (no ``classify`` timing), though
  both models are loaded (a bad checkpoint still fails). The overlay is still rendered
  (a reader sees what was in the series) and says "NOT ASSESSABLE"; the console says so; the exit
  code is 0: it is a result, written like any other, not a failure of the command (scripts read
  ``assessable``; exit 1 stays for input that cannot be read).

The DICOM folder is read with the converter's reader (`data_tools.dicom.read_series`: every real-
data quirk, the same error policy), so a bad folder (not CT, corrupt file, gap in z, ...) fails
with `error: <folder>: <why, naming the file>` and exit 1, before anything is written; a flag
naming a folder that is not there is a usage error (exit 2; `cspine_jax.cli`). Outputs are
written under temporary names and renamed, so OUT never holds a half-written file. No patient or
institution tag (not even the StudyInstanceUID) reaches prediction.json, overlay.png, the batch
files or the console; seg.dcm and sr.dcm, filed back with their study, copy its patient and study
identifiers and nothing else (by design: `cspine_jax.dicom_outputs`). The vertebra crops are made by
the training pipeline's code (`transforms.make_vertebra_crops`) from the localizer's boxes.
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

from cspine_jax import cli
from cspine_jax import predict_lib
from cspine_jax.data import kvstore
from cspine_jax.data import store
from data_tools import convert
from data_tools import dicom

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string('classifier', None, 'Fracture classifier workdir (e.g. configs/demo.py).')
  flags.DEFINE_string('localizer', None, 'Localizer workdir (configs/localizer.py).')
  flags.DEFINE_string('dicom', None, 'Folder of one CT series (.dcm slices), or a folder of study '
                      'folders (test_images/<UID>/, or an RSNA root with train_images/, '
                      'test_images/): a batch.')
  flags.DEFINE_string('data', None, 'A converted dataset (python -m data_tools.convert): predict '
                      'every study of its manifest from its volumes (a batch).')
  flags.DEFINE_string('output', None, 'Output folder (prediction.json, overlay.png; a batch: '
                      'one folder per study, submission.csv, failures.jsonl).')
  flags.DEFINE_string('classifier_checkpoint', 'latest', 'latest, best or a step.')
  flags.DEFINE_string('localizer_checkpoint', 'latest', 'latest or a step.')
  flags.DEFINE_bool('dicom_outputs', False, 'Also write seg.dcm (DICOM SEG of the vertebra mask) '
                    'and sr.dcm (DICOM SR of the probabilities) beside prediction.json.')
  flags.DEFINE_float('threshold', 0.5, 'Fracture decision threshold stated in the SR (0 < t < 1).')
  flags.DEFINE_bool('progress', True, 'Show a progress bar on stderr (batch).')
  flags.mark_flags_as_required(['classifier', 'localizer', 'output'])


# ---------------------------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------------------------


def _check_flags() -> None:
  if bool(FLAGS.dicom) == bool(FLAGS.data):
    raise cli.UsageError('give one of --dicom (a series, or a folder of study folders) and '
                         '--data (a converted dataset)')
  for name in ('dicom', 'data', 'classifier', 'localizer'):
    if name == 'data' and kvstore.is_url(FLAGS.data):
      continue  # a bucket: store.dataset checks it
    if FLAGS[name].value and not os.path.isdir(FLAGS[name].value):
      raise cli.UsageError(f'--{name}={FLAGS[name].value} is not a folder')
  if FLAGS.data:
    store.dataset(FLAGS.data, '--data')
  if FLAGS.data and FLAGS.dicom_outputs:
    raise cli.UsageError('--dicom_outputs needs --dicom: the SEG and SR reference the source '
                         "series' files, which a converted dataset does not keep")
  if not 0.0 < FLAGS.threshold < 1.0:
    raise cli.UsageError(f'--threshold={FLAGS.threshold}: must be between 0 and 1 (exclusive)')
  if os.path.exists(FLAGS.output) and not os.path.isdir(FLAGS.output):
    raise cli.UsageError(f'--output={FLAGS.output} is a file, not a folder')


def _main_one() -> None:
  try:
    prediction = predict_lib.predict_one(FLAGS.classifier, FLAGS.localizer, FLAGS.dicom,
                                         FLAGS.classifier_checkpoint, FLAGS.localizer_checkpoint)
  except dicom.StudyError as e:
    raise cli.Failure(f'{FLAGS.dicom}: {e}') from e
  names = predict_lib.write_study(FLAGS.output, prediction,
                                  FLAGS.dicom if FLAGS.dicom_outputs else None, FLAGS.threshold)
  result = prediction.result
  print(predict_lib.summary(result))
  shown = [n for n in (predict_lib.PREDICTION, predict_lib.OVERLAY, predict_lib.SEG,
                       predict_lib.SR) if n in names]
  print(f'{result["timings_s"]["total"]:.2f} s -> '
        + ', '.join(f'{FLAGS.output}/{n}' for n in shown))


def _main_batch() -> None:
  if FLAGS.data:
    source, jobs = 'data', predict_lib.converted_jobs(FLAGS.data)
    where = f'--data {FLAGS.data} (its manifest lists no study)'
  else:
    source, jobs = 'dicom', predict_lib.dicom_jobs(FLAGS.dicom)
    where = f'--dicom {FLAGS.dicom}: expected {convert.EXPECTED_LAYOUT}'
  if not jobs:
    raise cli.Failure(f'no study found under {where}')
  predictor = predict_lib.Predictor(FLAGS.classifier, FLAGS.localizer,
                                    FLAGS.classifier_checkpoint, FLAGS.localizer_checkpoint)
  s = predict_lib.run_batch(predictor, jobs, FLAGS.output, source, FLAGS.data,
                            FLAGS.dicom_outputs, FLAGS.threshold, FLAGS.progress)
  rate = (f'{s.per_minute:.1f} studies/min ({len(s.predicted)} in {s.elapsed_s:.1f} s, models '
          f'loaded in {predictor.load_s:.1f} s)' if s.predicted else 'nothing new to predict')
  print(f'{s.studies} studies: {len(s.predicted)} predicted, {len(s.skipped)} already done, '
        f'{len(s.failures)} failed; {rate} -> {os.path.join(FLAGS.output, predict_lib.SUBMISSION)}')
  if s.filled:
    cli.warn(f'{s.filled} studies have null probabilities (not assessable, or vertebrae not '
             'found; prediction.json says which): submission.csv has the training prevalence '
             'there (predict_lib.SUBMISSION_FALLBACK)')
  for study, error in s.failures.items():
    print(f'FAILED {study}: {error}', flush=True)
  if s.failures:
    # The command's last line, as cli.run ends any failure: how many, and where to look.
    print(f'error: {len(s.failures)} of {s.studies} studies failed (see '
          f'{os.path.join(FLAGS.output, predict_lib.FAILURES)})', file=sys.stderr, flush=True)
    sys.exit(cli.FAILURE)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  _check_flags()
  if FLAGS.dicom and predict_lib.is_one_series(FLAGS.dicom):
    _main_one()
  else:
    _main_batch()


if __name__ == '__main__':
  define_flags()
  cli.run(main)
