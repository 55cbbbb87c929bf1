"""DICOM results of one predicted study: a Segmentation of C1-C7 and a TID 1500 measurement report.

  seg.dcm  DICOM Segmentation (BINARY) of the localizer's C1-C7 mask on the source series' own
           frames: one segment per vertebra found, one frame per (segment, source slice) where
           that vertebra is present, each frame referencing its source slice (SOPInstanceUID)
           and carrying that slice's ImagePositionPatient and orientation; a PACS viewer overlays
           it on the CT without resampling.
  sr.dcm   Comprehensive 3D SR, TID 1500 "Imaging Measurement Report": per vertebra a finding
           group (finding "Fracture" at the vertebra, its probability, fracture present/absent
           at the threshold, the segment it refers to), and a patient-level group.

Built with highdicom from the source series' headers; ``write`` is what ``cspine_jax.predict``
calls, ``build_seg`` / ``build_sr`` are the pure builders.

Choices (documented here because a reader of the DICOM sees only their result):
- BINARY segmentation, not FRACTIONAL: the localizer's output is a label map (argmax), and BINARY
  is the most widely supported SEG type (FRACTIONAL would only repeat 0/1 in 8 bits). Not
  LABELMAP (the 2024 SOP class): support for it is still new. Empty frames are omitted (a
  vertebra spans ~1/10 of the slices); 300 slices of 512x512 give ~175 frames, ~6 MB, ~3 s.
- Segment numbers are 1..k over the vertebrae found, in C1..C7 order (highdicom requires BINARY
  segments numbered from 1 without gaps), so segment n is not label n when a level is missing:
  the vertebra of each segment is its SegmentedPropertyType (and SegmentLabel "C1".."C7").
- Codes: category SCT 91723000 "Anatomical Structure"; type the vertebra from pydicom's
  codedict (C1 14806007, C2 39976000, C3 113205007, C4 5329002, C5 36978003, C6 36054005,
  C7 87391001; 22445006, sometimes quoted for C2, is a deciduous incisor tooth). The finding is
  SCT 72704001 "Fracture" (the morphologic abnormality; SNOMED's fracture disorders are this
  morphology at a bone finding site, which is how the SR codes it: finding type Fracture, finding
  site the vertebra). Its qualitative evaluation is "Fracture" = SCT 52101004 "Present" /
  SCT 272519000 "Absent" at the threshold, or DCM 121059 "Presence Undetermined"; the
  probability is a NUM "Probability" (DCM 122157), unit UCUM "1" (no units), value in [0, 1]
  (stored exactly as FloatingPointValue beside the 16-character NumericValue).
- A vertebra not found (probability null) gets no segment and no probability, but it does get
  a group: finding Fracture at that vertebra, "Presence Undetermined", no measurement, no
  region. Silence would read as "nothing there"; predict.py's policy is that a level nobody
  looked at is neither found nor ruled out, and the SR says so. For the same reason the
  patient-level evaluation is "Present" when patient_overall >= threshold, "Absent" only when
  it is below and every level was assessed, else "Presence Undetermined" (the probability is
  still recorded).
- Not assessable (no vertebra found): no seg.dcm (a Segmentation needs a segment; a stale one in
  out_dir is removed), and an sr.dcm whose groups all say "Presence Undetermined" with no
  probability: a worklist then shows that the algorithm ran and could not assess the study,
  which no report at all would not distinguish from "not run".
- Identifiers: only PatientName, PatientID, IssuerOfPatientID, PatientBirthDate, PatientSex,
  StudyInstanceUID, StudyDate, StudyTime, StudyID, AccessionNumber, ReferringPhysicianName (and
  SpecificCharacterSet, to decode them) come from the source, besides the references (SOP/series
  /frame-of-reference UIDs) and geometry. highdicom copies every Patient- and Study-module
  attribute of its first source and puts the source's acquisition equipment (Manufacturer,
  InstitutionName, StationName, DeviceSerialNumber...) in ContributingEquipmentSequence, so it
  is given a reduced copy of each source header holding only those attributes (a type-2 one the
  source lacks is written empty; highdicom would fail on it): nothing else can
  reach the output (tests/test_dicom_outputs.py writes an institution, a station, a serial
  number, patient comments... into the source and searches the outputs' bytes for them).
- Research use: ContentQualification RESEARCH; the SR is COMPLETE, PRELIMINARY and UNVERIFIED
  (no human has signed it).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import os

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cspine_jax import constants
from cspine_jax import overlay
from cspine_jax.data import store

SEG_NAME, SR_NAME = 'seg.dcm', 'sr.dcm'
MANUFACTURER = 'cspine_jax'
SEG_SERIES_NUMBER, SR_SERIES_NUMBER = 901, 902  # high numbers, clear of the scanner's series

VERTEBRA_CODES = {v: getattr(codes.SCT, f'{v}Vertebra') for v in constants.VERTEBRAE}
FRACTURE = Code('72704001', 'SCT', 'Fracture')  # not in pydicom's codedict
PRESENT, ABSENT, UNDETERMINED = codes.SCT.Present, codes.SCT.Absent, codes.DCM.PresenceUndetermined
PROBABILITY, NO_UNITS = codes.DCM.Probability, codes.UCUM.NoUnits
CERVICAL_SPINE = codes.SCT.CervicalSpine

# What of a source header reaches the outputs (through highdicom): identity, reference, geometry.
IDENTITY = ('PatientName', 'PatientID', 'IssuerOfPatientID', 'PatientBirthDate', 'PatientSex',
            'StudyInstanceUID', 'StudyDate', 'StudyTime', 'StudyID', 'AccessionNumber',
            'ReferringPhysicianName')
_TYPE2 = ('PatientName', 'PatientID', 'PatientBirthDate', 'PatientSex', 'StudyDate', 'StudyTime',
          'StudyID', 'AccessionNumber', 'ReferringPhysicianName')  # highdicom reads them all
_REFERENCE = ('SpecificCharacterSet', 'SOPClassUID', 'SOPInstanceUID', 'SeriesInstanceUID',
              'Modality', 'FrameOfReferenceUID', 'PositionReferenceIndicator')
_GEOMETRY = ('Rows', 'Columns', 'PixelSpacing', 'ImageOrientationPatient', 'ImagePositionPatient',
             'SliceThickness', 'SpacingBetweenSlices', 'LossyImageCompression',
             'LossyImageCompressionRatio', 'LossyImageCompressionMethod')
KEPT = IDENTITY + _REFERENCE + _GEOMETRY


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """What made the result: the package version and the two checkpoints' steps."""
  version: str
  classifier_step: int | None
  localizer_step: int | None

  @classmethod
  def from_result(cls, result: dict) -> 'Algorithm':
    steps = result.get('checkpoints') or {}
    return cls(package_version(), steps.get('classifier'), steps.get('localizer'))

  def localizer_version(self) -> str:
    return f'{self.version} localizer step {self.localizer_step}'

  def classifier_version(self) -> str:
    return (f'{self.version} classifier step {self.classifier_step} '
            f'localizer step {self.localizer_step}')


def package_version() -> str:
  try:
    return importlib.metadata.version('cspine_jax')
  except importlib.metadata.PackageNotFoundError:  # run from a checkout without install
    return 'unknown'


def minimal_source(ds: Dataset) -> Dataset:
  """A copy of a source header holding only KEPT (what highdicom is allowed to copy)."""
  out = Dataset()
  for keyword in KEPT:
    if keyword in ds:
      out[keyword] = ds[keyword]
  for keyword in _TYPE2:  # type 2: present, may be empty
    if keyword not in out:
      setattr(out, keyword, None)
  meta = FileMetaDataset()
  syntax = getattr(getattr(ds, 'file_meta', None), 'TransferSyntaxUID', None)
  meta.TransferSyntaxUID = syntax or pydicom.uid.ExplicitVRLittleEndian
  out.file_meta = meta
  return out


def _labels_present(labels: np.ndarray) -> list[int]:
  values = np.unique(labels)
  bad = [int(v) for v in values if not 0 <= v <= len(constants.VERTEBRAE)]
  if bad:
    raise ValueError(f'labels must be 0 (background) or 1..7 (C1..C7), found {bad[:5]}')
  return [int(v) for v in values if v > 0]


def build_seg(sources: list[Dataset], labels: np.ndarray, algorithm: Algorithm
              ) -> hd.seg.Segmentation:
  """The BINARY Segmentation of ``labels`` ((z, y, x), 0 and 1..7 = C1..C7, z in the order of
  ``sources``: labels[i] lies on sources[i]'s own pixel grid, rows and columns as stored)."""
  labels = np.asarray(labels)
  if labels.ndim != 3 or labels.shape[0] != len(sources):
    raise ValueError(f'labels {labels.shape} must be (z, y, x) with z = one per source slice '
                     f'({len(sources)})')
  rows, cols = int(sources[0].Rows), int(sources[0].Columns)
  if labels.shape[1:] != (rows, cols):
    raise ValueError(f'labels {labels.shape[1:]} do not match the slices ({rows}, {cols})')
  present = _labels_present(labels)
  if not present:
    raise ValueError('no vertebra in labels: a Segmentation needs at least one segment')
  family = codes.DCM.ArtificialIntelligence
  algo = hd.AlgorithmIdentificationSequence(
      name='cspine_jax localizer', family=family, version=algorithm.localizer_version())
  lut = np.zeros(256, np.uint8)
  descriptions = []
  for number, label in enumerate(present, start=1):
    name = constants.VERTEBRAE[label - 1]
    lut[label] = number
    descriptions.append(hd.seg.SegmentDescription(
        segment_number=number, segment_label=name,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=VERTEBRA_CODES[name],
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo, tracking_id=name, tracking_uid=hd.UID(),
        anatomic_regions=[CERVICAL_SPINE],
        display_color=hd.color.CIELabColor.from_rgb(*overlay.COLORS[label - 1])))
  # Label-map style input (values = segment numbers): highdicom splits it into one binary
  # frame per (segment, slice), frame i of the array going with sources[i] (its
  # SOPInstanceUID, ImagePositionPatient and orientation).
  seg = hd.seg.Segmentation(
      source_images=[minimal_source(ds) for ds in sources],
      pixel_array=lut[labels.astype(np.uint8)],
      segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
      segment_descriptions=descriptions,
      series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
      sop_instance_uid=hd.UID(), instance_number=1,
      manufacturer=MANUFACTURER, manufacturer_model_name='cspine_jax localizer',
      software_versions=algorithm.localizer_version(),
      device_serial_number='none',  # type 1 in SEG; software has no serial
      series_description='cspine_jax C1-C7 (research)',
      content_label='VERTEBRAE', content_description='C1-C7 from the cspine_jax localizer',
      content_qualification='RESEARCH',
      omit_empty_frames=True)
  return seg


def _vertebra_group(name: str, probability, threshold: float, seg, segment_number,
                    algo_id) -> hd.sr.MeasurementsAndQualitativeEvaluations:
  tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f'{name} fracture')
  site = [hd.sr.FindingSite(VERTEBRA_CODES[name])]
  if probability is None:  # not found: no region, no number, explicitly undetermined
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=FRACTURE, finding_sites=site,
        algorithm_id=algo_id,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(FRACTURE, UNDETERMINED)])
  measurement = hd.sr.Measurement(name=PROBABILITY, value=float(probability), unit=NO_UNITS,
                                  algorithm_id=algo_id)
  evaluation = hd.sr.QualitativeEvaluation(
      FRACTURE, PRESENT if probability >= threshold else ABSENT)
  referenced = hd.sr.ReferencedSegment(
      sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
      segment_number=segment_number,
      source_series=hd.sr.SourceSeriesForSegmentation(seg.ReferencedSeriesSequence[0]
                                                      .SeriesInstanceUID))
  return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
      tracking_identifier=tracking, referenced_segment=referenced, finding_type=FRACTURE,
      finding_sites=site, algorithm_id=algo_id, measurements=[measurement],
      qualitative_evaluations=[evaluation])


def build_sr(sources: list[Dataset], seg: hd.seg.Segmentation | None, result: dict,
             threshold: float, algorithm: Algorithm) -> hd.sr.Comprehensive3DSR:
  """The TID 1500 report of ``result`` (predict.predict()'s dict); ``seg`` is build_seg's
  Segmentation of the vertebrae found (None when none was: the study is not assessable)."""
  probabilities = result['probabilities']
  found = [v for v in constants.VERTEBRAE if probabilities.get(v) is not None]
  segment_of = {}
  if seg is not None:
    for item in seg.SegmentSequence:
      segment_of[str(item.SegmentLabel)] = int(item.SegmentNumber)
  if set(segment_of) != set(found):
    raise ValueError(f'segments {sorted(segment_of)} differ from the vertebrae with a '
                     f'probability {found}')
  algo_id = hd.sr.AlgorithmIdentification(
      name='cspine_jax classifier', version=algorithm.classifier_version(),
      family=codes.DCM.ArtificialIntelligence,
      parameters=[f'classifier checkpoint step {algorithm.classifier_step}',
                  f'localizer checkpoint step {algorithm.localizer_step}',
                  f'fracture threshold {threshold:g}'])
  groups = []
  patient = probabilities.get('patient_overall') if found else None
  tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier='patient_overall fracture')
  if patient is None:
    evaluation, measurements = UNDETERMINED, None
  else:
    evaluation = (PRESENT if patient >= threshold else
                  ABSENT if len(found) == len(constants.VERTEBRAE) else UNDETERMINED)
    measurements = [hd.sr.Measurement(name=PROBABILITY, value=float(patient), unit=NO_UNITS,
                                      algorithm_id=algo_id)]
  groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
      tracking_identifier=tracking, finding_type=FRACTURE,
      finding_sites=[hd.sr.FindingSite(CERVICAL_SPINE)], algorithm_id=algo_id,
      measurements=measurements,
      qualitative_evaluations=[hd.sr.QualitativeEvaluation(FRACTURE, evaluation)]))
  for name in constants.VERTEBRAE:
    p = probabilities.get(name)
    groups.append(_vertebra_group(name, p, threshold, seg, segment_of.get(name), algo_id))

  device = hd.sr.DeviceObserverIdentifyingAttributes(
      uid=pydicom.uid.generate_uid(entropy_srcs=['cspine_jax', algorithm.classifier_version()]),
      name='cspine_jax', manufacturer_name=MANUFACTURER,
      model_name=f'cspine_jax {algorithm.version}')
  context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
      observer_type=codes.DCM.Device, observer_identifying_attributes=device))
  report = hd.sr.MeasurementReport(
      observation_context=context, procedure_reported=codes.SCT.ImagingProcedure,
      imaging_measurements=groups)
  evidence = [minimal_source(ds) for ds in sources]  # first: highdicom copies identity from it
  if seg is not None:
    evidence.append(seg)
  return hd.sr.Comprehensive3DSR(
      evidence=evidence, content=report[0],
      series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
      sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
      is_complete=True, is_final=False, is_verified=False,
      series_description='cspine_jax fracture report (research)',
      content_qualification='RESEARCH')


def _encode(ds: Dataset) -> bytes:
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  return buffer.getvalue()


def write(out_dir: str, dicom_dir: str, slice_files: list[str], labels: np.ndarray, result: dict,
          threshold: float = 0.5) -> list[str]:
  """Writes out_dir/seg.dcm and out_dir/sr.dcm (each atomically: store.atomic_write) for one
  study; returns the paths written. `labels` is the (z, y, x) uint8 mask on the volume grid
  (0 background, 1..7 = C1..C7) whose z index i is the slice file slice_files[i] of dicom_dir;
  `result` is predict.predict()'s dict (probabilities with nulls, checkpoints, assessable).

  The mask and the result must agree (a vertebra has a probability iff it is in the mask; they
  come from one localization), else ValueError. Not assessable (no vertebra found): sr.dcm only,
  and a seg.dcm left in out_dir by an earlier run is removed.
  """
  labels = np.asarray(labels)
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f'threshold {threshold} must be in [0, 1]')
  if labels.ndim != 3 or labels.shape[0] != len(slice_files):
    raise ValueError(f'labels {labels.shape}: need (z, y, x) with z = len(slice_files) '
                     f'({len(slice_files)})')
  in_mask = {constants.VERTEBRAE[v - 1] for v in _labels_present(labels)}
  with_p = {v for v in constants.VERTEBRAE if result['probabilities'].get(v) is not None}
  if in_mask != with_p:
    raise ValueError(f'the mask holds {sorted(in_mask)} but the result gives probabilities for '
                     f'{sorted(with_p)}')
  sources = [pydicom.dcmread(os.path.join(dicom_dir, name), stop_before_pixels=True)
             for name in slice_files]
  algorithm = Algorithm.from_result(result)
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  seg = None
  seg_path = os.path.join(out_dir, SEG_NAME)
  if in_mask:
    seg = build_seg(sources, labels, algorithm)
    store.atomic_write(seg_path, _encode(seg))
    paths.append(seg_path)
  elif os.path.exists(seg_path):
    os.remove(seg_path)  # a stale segmentation must not sit beside a "not assessable" report
  sr = build_sr(sources, seg, result, threshold, algorithm)
  sr_path = os.path.join(out_dir, SR_NAME)
  store.atomic_write(sr_path, _encode(sr))
  paths.append(sr_path)
  return paths
