"""cspine_jax.dicom_outputs: seg.dcm and sr.dcm read back independently of the writing code.

The SEG is checked against the synthetic study's TRUE C1-C7 mask, frame by frame: each frame's
source slice is found by its ReferencedSOPInstanceUID in the source folder and placed in the
volume by that file's ImagePositionPatient projected on the generator's slice axis (never
through the converter's slice_files), and its pixels must equal the mask on that slice exactly,
for every orientation quirk the converter handles (feet-first, mirrored rows, signed and
unsigned storage, JPEG Lossless / implicit / explicit VR). The SR is walked as plain pydicom
content items. Identifiers must equal the source's; the source's institution, equipment and
free-text patient/study tags must not be anywhere in the output bytes.
"""
import os

import highdicom as hd
import numpy as np
import pydicom
import pytest

from cspine_jax import dicom_outputs
from data_tools import dicom
from data_tools import synthetic

VERTEBRAE = ('C1', 'C2', 'C3', 'C4', 'C5', 'C6', 'C7')
# SNOMED CT codes written down here, not taken from the module under test.
VERTEBRA_SCT = {'14806007': 1, '39976000': 2, '113205007': 3, '5329002': 4, '36978003': 5,
                '36054005': 6, '87391001': 7}
FRACTURE, PRESENT, ABSENT, UNDETERMINED = '72704001', '52101004', '272519000', '121059'
IDENTITY = ('PatientName', 'PatientID', 'PatientBirthDate', 'PatientSex', 'StudyInstanceUID',
            'StudyDate', 'StudyTime', 'StudyID', 'AccessionNumber', 'ReferringPhysicianName')
# Written into every source slice; none may reach seg.dcm or sr.dcm.
LEAKS = {
    'InstitutionAddress': 'Nowhere Street 7 Faketown', 'StationName': 'CTSTATION42',
    'DeviceSerialNumber': 'SERIAL-998877', 'InstitutionalDepartmentName': 'Fake Trauma Dept',
    'OperatorsName': 'Operator^Fictive', 'PerformingPhysicianName': 'Performer^Imaginary',
    'ManufacturerModelName': 'PhantomScanner 3000', 'SoftwareVersions': 'scanner-sw-4.5.6',
    'PatientComments': 'comment about the patient xyz', 'StudyDescription': 'CT NECK TRAUMA xyz',
    'OtherPatientIDs': 'OTHERPID123456', 'PatientAge': '047Y', 'PatientWeight': '81.5',
    'AdditionalPatientHistory': 'fell from a ladder xyz', 'AdmittingDiagnosesDescription': 'neck',
}
# Output elements that may hold a source value: identity, references, geometry, and the few
# pixel-format values a 1-bit SEG shares with a CT by coincidence.
MAY_EQUAL_SOURCE = set(IDENTITY) | {
    'FrameOfReferenceUID', 'ImageOrientationPatient', 'ImagePositionPatient', 'PixelSpacing',
    'SliceThickness', 'Rows', 'Columns', 'SamplesPerPixel', 'PhotometricInterpretation',
    'PixelRepresentation', 'InstanceNumber', 'SeriesInstanceUID', 'SOPClassUID',
    'PositionReferenceIndicator'}

QUIRKS = {
    'head_first_unsigned_explicit': dict(feet_first=False, mirrored=False, storage='unsigned16',
                                         transfer_syntax=synthetic.EXPLICIT_VR_LE),
    'feet_first_mirrored_signed_jpeg': dict(feet_first=True, mirrored=True,
                                            storage='signed16_offset',
                                            transfer_syntax=synthetic.JPEG_LOSSLESS),
    'feet_first_signed12_implicit': dict(feet_first=True, mirrored=False, storage='signed12',
                                         transfer_syntax=synthetic.IMPLICIT_VR_LE),
    'mirrored_unsigned12_jpeg': dict(feet_first=False, mirrored=True, storage='unsigned12',
                                     transfer_syntax=synthetic.JPEG_LOSSLESS),
}


class Case:
  """One synthetic study written as DICOM (with the leak markers), its truth and geometry."""

  def __init__(self, root, index, quirks):
    self.study = synthetic.make_study(11, index, 40, **quirks)
    synthetic.write_study(self.study, str(root), 'train', None)
    self.folder = os.path.join(str(root), 'train_images', self.study.uid)
    self.sources = {}  # SOPInstanceUID -> header
    for name in sorted(os.listdir(self.folder)):
      path = os.path.join(self.folder, name)
      ds = pydicom.dcmread(path)
      for keyword, value in LEAKS.items():
        setattr(ds, keyword, value)
      ds.save_as(path)
      self.sources[str(ds.SOPInstanceUID)] = pydicom.dcmread(path, stop_before_pixels=True)
    self.series = dicom.read_series(self.folder)
    # The converter's grid is the generator's (so the truth is "laid on the volume grid").
    np.testing.assert_array_equal(self.series.hu, self.study.hu)
    truth = self.study.labels_volume
    self.truth = np.where(truth <= 7, truth, 0).astype(np.uint8)  # thoracic -> background

  def z_of(self, ipp) -> int:
    """Volume z index (0 = most superior) of a slice at ImagePositionPatient ``ipp``, from the
    generator's geometry: the offset from the origin along the slice axis, in slices."""
    s = self.study
    offset = float((np.asarray(ipp, float) - s.origin) @ s.slice_dir) / s.spacing[0]
    z = int(round(offset))
    assert abs(offset - z) < 1e-3 and 0 <= z < s.hu.shape[0], (offset, ipp)
    return z


@pytest.fixture(scope='module')
def cases(tmp_path_factory):
  root = tmp_path_factory.mktemp('dicom_outputs')
  return {name: Case(root / name, i, q) for i, (name, q) in enumerate(QUIRKS.items())}


def _result(probabilities: dict, patient=0.7) -> dict:
  found = [v for v in VERTEBRAE if probabilities.get(v) is not None]
  return {
      'assessable': bool(found),
      'probabilities': {'patient_overall': patient if found else None,
                        **{v: probabilities.get(v) for v in VERTEBRAE}},
      'not_assessed': {v: f'the localizer found no {v}' for v in VERTEBRAE if v not in found},
      'checkpoints': {'classifier': 1234, 'localizer': 5678},
  }


PROBS = {'C1': 0.02, 'C2': 0.91, 'C3': 0.5, 'C4': 0.4999, 'C5': 0.123456789012345678,
         'C6': 0.75, 'C7': 0.0}


# ---------------------------------------------------------------------------------------------
# Independent readers.
# ---------------------------------------------------------------------------------------------


def _segment_labels(seg) -> dict[int, int]:
  """Segment number -> vertebra label 1..7 from each segment's SegmentedPropertyType."""
  out = {}
  for item in seg.SegmentSequence:
    category = item.SegmentedPropertyCategoryCodeSequence[0]
    assert (category.CodeValue, category.CodingSchemeDesignator) == ('91723000', 'SCT')
    code = item.SegmentedPropertyTypeCodeSequence[0]
    assert code.CodingSchemeDesignator == 'SCT'
    out[int(item.SegmentNumber)] = VERTEBRA_SCT[code.CodeValue]
    assert item.SegmentLabel == VERTEBRAE[out[int(item.SegmentNumber)] - 1]
    assert item.SegmentAlgorithmType == 'AUTOMATIC'
  return out


def check_seg_geometry(case: Case, path: str, truth: np.ndarray) -> dict[int, int]:
  """Every frame equals the truth on its own source slice; every non-empty (segment, slice)
  has a frame. Returns segment number -> label."""
  seg = pydicom.dcmread(path)
  assert seg.Modality == 'SEG' and seg.SegmentationType == 'BINARY'
  labels_of = _segment_labels(seg)
  frames = seg.pixel_array
  if frames.ndim == 2:
    frames = frames[None]
  assert frames.shape[0] == int(seg.NumberOfFrames) == len(seg.PerFrameFunctionalGroupsSequence)
  shared = seg.SharedFunctionalGroupsSequence[0]
  seen = set()
  for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
    number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
    ref = item.DerivationImageSequence[0].SourceImageSequence[0]
    source = case.sources[str(ref.ReferencedSOPInstanceUID)]  # KeyError: not a source slice
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    z = case.z_of(source.ImagePositionPatient)
    # The frame is placed where its source slice is, with the source's row/column directions.
    np.testing.assert_allclose([float(v) for v in item.PlanePositionSequence[0]
                                .ImagePositionPatient],
                               [float(v) for v in source.ImagePositionPatient], atol=1e-4)
    frame_iop = item.get('PlaneOrientationSequence') or shared.PlaneOrientationSequence
    np.testing.assert_allclose([float(v) for v in frame_iop[0].ImageOrientationPatient],
                               [float(v) for v in source.ImageOrientationPatient], atol=1e-6)
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in source.PixelSpacing])
    label = labels_of[number]
    expected = truth[z] == label
    assert expected.any(), f'frame {i + 1}: empty truth for {VERTEBRAE[label - 1]} at z={z}'
    np.testing.assert_array_equal(frames[i].astype(bool), expected,
                                  err_msg=f'frame {i + 1}: {VERTEBRAE[label - 1]} at z={z}')
    assert (label, z) not in seen
    seen.add((label, z))
  wanted = {(int(l), z) for z in range(truth.shape[0]) for l in np.unique(truth[z]) if l}
  assert seen == wanted
  # The same through highdicom's reader, by source instance.
  hseg = hd.seg.segread(path)
  uid_by_z = {case.z_of(ds.ImagePositionPatient): uid for uid, ds in case.sources.items()}
  zs = sorted({z for _, z in wanted})
  numbers = sorted(labels_of)
  pixels = hseg.get_pixels_by_source_instance(
      source_sop_instance_uids=[uid_by_z[z] for z in zs], segment_numbers=numbers,
      assert_missing_frames_are_empty=True)
  for k, z in enumerate(zs):
    for j, number in enumerate(numbers):
      np.testing.assert_array_equal(pixels[k, :, :, j].astype(bool), truth[z] == labels_of[number])
  return labels_of


def _code(item, attr='ConceptNameCodeSequence'):
  return str(item[attr][0].CodeValue)


def sr_groups(sr) -> list:
  """The measurement groups (TID 1501 / 1411) under Imaging Measurements."""
  measurements = [i for i in sr.ContentSequence if _code(i) == '126010']
  assert len(measurements) == 1
  groups = [i for i in measurements[0].ContentSequence if _code(i) == '125007']
  return groups


def read_group(group) -> dict:
  out = {'site': None, 'probability': [], 'evaluation': [], 'segment': None,
         'source_series': None, 'algorithm_version': None, 'finding': None}
  for item in group.ContentSequence:
    code = _code(item)
    if code == '363698007':  # Finding Site
      out['site'] = _code(item, 'ConceptCodeSequence')
    elif code == '121071':  # Finding
      out['finding'] = _code(item, 'ConceptCodeSequence')
    elif code == '122157':  # Probability
      assert item.ValueType == 'NUM'
      value = item.MeasuredValueSequence[0]
      assert value.MeasurementUnitsCodeSequence[0].CodeValue == '1'
      out['probability'].append(float(value.FloatingPointValue))
      assert abs(float(value.NumericValue) - float(value.FloatingPointValue)) < 1e-12
    elif code == FRACTURE:
      out['evaluation'].append(_code(item, 'ConceptCodeSequence'))
    elif code == '121191':  # Referenced Segment
      ref = item.ReferencedSOPSequence[0]
      out['segment'] = (str(ref.ReferencedSOPInstanceUID), int(ref.ReferencedSegmentNumber),
                        str(ref.ReferencedSOPClassUID))
    elif code == '121232':  # Source series for segmentation
      out['source_series'] = str(item.UID)
    elif code == '111003':  # Algorithm Version
      out['algorithm_version'] = str(item.TextValue)
  return out


def sr_by_site(sr) -> dict[str, dict]:
  out = {}
  for group in sr_groups(sr):
    g = read_group(group)
    assert g['finding'] == FRACTURE
    name = 'patient_overall' if g['site'] == '122494005' else VERTEBRAE[VERTEBRA_SCT[g['site']] - 1]
    assert name not in out
    out[name] = g
  return out


def check_identity_and_leaks(case: Case, path: str):
  raw = open(path, 'rb').read()
  out = pydicom.dcmread(path)
  for keyword in IDENTITY:
    values = {str(ds.get(keyword, '') or '') for ds in case.sources.values()}
    # StudyTime: GDCM stamps one per file when it writes JPEG Lossless; the output holds one.
    assert str(out.get(keyword, '') or '') in values, (keyword, out.get(keyword), values)
  assert str(out.PatientName) == case.study.phi['PatientName']
  assert out.PatientID == case.study.phi['PatientID']
  secrets_ = [case.study.phi['InstitutionName'], 'cspine_jax synthetic', *LEAKS.values()]
  for secret in secrets_:
    assert secret.encode() not in raw, f'{secret!r} leaked into {os.path.basename(path)}'
  # No other source value anywhere in the output (any depth), beyond identity/geometry/refs.
  source = next(iter(case.sources.values()))
  for element in out.iterall():
    keyword = element.keyword
    if not keyword or keyword in MAY_EQUAL_SOURCE or keyword not in source:
      continue
    if element.VR == 'SQ' or element.value in (None, ''):
      continue
    assert str(source[keyword].value) != str(element.value), f'{keyword} copied from the source'
  for item in out.get('ContributingEquipmentSequence', []):
    assert item.Manufacturer == 'Highdicom open-source contributors'


# ---------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', list(QUIRKS))
def test_seg_frames_equal_the_true_mask_on_their_source_slices(cases, name, tmp_path):
  case = cases[name]
  truth = case.truth
  # The checks can tell a flipped or shifted mask from the right one.
  assert set(np.unique(truth)) == set(range(8))
  for wrong in (truth[:, ::-1], truth[:, :, ::-1], truth[::-1], np.roll(truth, 1, 0)):
    assert not np.array_equal(wrong, truth)
  paths = dicom_outputs.write(str(tmp_path), case.folder, case.series.slice_files, truth,
                              _result(PROBS))
  assert paths == [str(tmp_path / 'seg.dcm'), str(tmp_path / 'sr.dcm')]
  labels_of = check_seg_geometry(case, paths[0], truth)
  assert sorted(labels_of.values()) == list(range(1, 8))
  seg = pydicom.dcmread(paths[0])
  assert seg.Manufacturer == 'cspine_jax'
  assert seg.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in case.sources.values()}
  versions = {str(i.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion)
              for i in seg.SegmentSequence}
  assert len(versions) == 1 and 'localizer step 5678' in versions.pop()
  check_identity_and_leaks(case, paths[0])
  check_identity_and_leaks(case, paths[1])
  assert sorted(os.listdir(tmp_path)) == ['seg.dcm', 'sr.dcm']  # no temporaries left


def test_sr_references_probabilities_and_evaluations(cases, tmp_path):
  case = cases['feet_first_mirrored_signed_jpeg']
  threshold = 0.5
  result = _result(PROBS, patient=0.93)
  seg_path, sr_path = dicom_outputs.write(str(tmp_path), case.folder, case.series.slice_files,
                                          case.truth, result, threshold)
  seg = pydicom.dcmread(seg_path)
  labels_of = _segment_labels(seg)
  sr = pydicom.dcmread(sr_path)
  assert sr.SOPClassUID == '1.2.840.10008.5.1.4.1.1.88.34'  # Comprehensive 3D SR
  assert sr.ContentTemplateSequence[0].TemplateIdentifier == '1500'
  assert sr.StudyInstanceUID == seg.StudyInstanceUID == case.study.uid
  assert sr.SeriesInstanceUID not in (seg.SeriesInstanceUID,
                                      next(iter(case.sources.values())).SeriesInstanceUID)
  source_series = {str(ds.SeriesInstanceUID) for ds in case.sources.values()}
  groups = sr_by_site(sr)
  assert set(groups) == {'patient_overall', *VERTEBRAE}
  for name in VERTEBRAE:
    g = groups[name]
    assert g['probability'] == [PROBS[name]]  # exactly (FloatingPointValue)
    assert g['evaluation'] == [PRESENT if PROBS[name] >= threshold else ABSENT]
    uid, number, sop_class = g['segment']
    assert uid == seg.SOPInstanceUID and sop_class == seg.SOPClassUID
    assert labels_of[number] == VERTEBRAE.index(name) + 1
    assert g['source_series'] in source_series
    assert 'classifier step 1234' in g['algorithm_version']
    assert 'localizer step 5678' in g['algorithm_version']
  patient = groups['patient_overall']
  assert patient['probability'] == [0.93] and patient['evaluation'] == [PRESENT]
  assert patient['segment'] is None
  # Evidence: exactly the source slices and the SEG.
  evidence = {str(ref.ReferencedSOPInstanceUID)
              for study in sr.CurrentRequestedProcedureEvidenceSequence
              for series in study.ReferencedSeriesSequence
              for ref in series.ReferencedSOPSequence}
  assert evidence == set(case.sources) | {str(seg.SOPInstanceUID)}
  assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
      'COMPLETE', 'UNVERIFIED', 'PRELIMINARY')
  # highdicom's own reader parses it as a TID 1500 report with 7 volumetric groups.
  report = hd.sr.srread(sr_path).content
  volumetric = report.get_volumetric_roi_measurement_groups()
  assert len(volumetric) == 7
  refs = [g.referenced_segment for g in volumetric]
  assert {r.referenced_sop_instance_uid for r in refs} == {seg.SOPInstanceUID}
  assert sorted(n for r in refs for n in r.referenced_segment_numbers) == sorted(labels_of)


def test_vertebra_not_found_gets_no_segment_and_no_probability(cases, tmp_path):
  case = cases['mirrored_unsigned12_jpeg']
  truth = case.truth.copy()
  truth[np.isin(truth, (3, 7))] = 0  # the localizer found no C3 and no C7
  probs = {**PROBS, 'C3': None, 'C7': None}
  seg_path, sr_path = dicom_outputs.write(str(tmp_path), case.folder, case.series.slice_files,
                                          truth, _result(probs, patient=0.2))
  labels_of = check_seg_geometry(case, seg_path, truth)
  assert sorted(labels_of.values()) == [1, 2, 4, 5, 6]
  assert sorted(labels_of) == [1, 2, 3, 4, 5]  # BINARY segments are numbered without gaps
  groups = sr_by_site(pydicom.dcmread(sr_path))
  for name in ('C3', 'C7'):
    assert groups[name]['probability'] == [] and groups[name]['segment'] is None
    assert groups[name]['evaluation'] == [UNDETERMINED]
  for name in ('C1', 'C2', 'C4', 'C5', 'C6'):
    assert groups[name]['probability'] == [probs[name]]
    assert labels_of[groups[name]['segment'][1]] == VERTEBRAE.index(name) + 1
  # Below the threshold, but C3 and C7 were not seen: not "absent".
  assert groups['patient_overall']['probability'] == [0.2]
  assert groups['patient_overall']['evaluation'] == [UNDETERMINED]


def test_mask_and_result_must_agree(cases, tmp_path):
  case = cases['head_first_unsigned_explicit']
  with pytest.raises(ValueError, match='C3'):  # C3 in the mask, no probability
    dicom_outputs.write(str(tmp_path), case.folder, case.series.slice_files, case.truth,
                        _result({**PROBS, 'C3': None}))
  bad = case.truth.copy()
  bad[0, 0, 0] = 9
  with pytest.raises(ValueError, match='1..7'):
    dicom_outputs.write(str(tmp_path), case.folder, case.series.slice_files, bad,
                        _result(PROBS))
  assert os.listdir(tmp_path) == []


def test_not_assessable_writes_a_report_and_no_segmentation(cases, tmp_path):
  case = cases['feet_first_signed12_implicit']
  (tmp_path / 'seg.dcm').write_bytes(b'stale')  # from an earlier run
  none = np.zeros_like(case.truth)
  result = _result({})
  assert result['assessable'] is False
  paths = dicom_outputs.write(str(tmp_path), case.folder, case.series.slice_files, none, result)
  assert paths == [str(tmp_path / 'sr.dcm')] and os.listdir(tmp_path) == ['sr.dcm']
  groups = sr_by_site(pydicom.dcmread(paths[0]))
  assert set(groups) == {'patient_overall', *VERTEBRAE}
  for g in groups.values():
    assert g['probability'] == [] and g['segment'] is None and g['evaluation'] == [UNDETERMINED]
  check_identity_and_leaks(case, paths[0])
