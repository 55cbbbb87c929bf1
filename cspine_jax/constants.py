"""Names and orders shared by every part of the system (no heavy imports here)."""

VERTEBRAE = ('C1', 'C2', 'C3', 'C4', 'C5', 'C6', 'C7')
# Order of the 8 targets everywhere: logits, labels, manifests, metrics.
TARGETS = ('patient_overall',) + VERTEBRAE
NUM_TARGETS = len(TARGETS)

# RSNA 2022 metric weights (DESIGN.md section 1): negative / positive label.
NEGATIVE_WEIGHTS = (7.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
POSITIVE_WEIGHTS = (14.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0)

# Training-set positive rates of the real data (patient, C1..C7), for priors and synthetic data.
POSITIVE_RATES = (0.476, 0.072, 0.141, 0.036, 0.053, 0.080, 0.137, 0.195)
