"""The patient-grouped validation split: no child on both sides."""

import csv

import pytest
from conftest import TINY

from cxr import dataset


def test_patient_ids():
    assert dataset.patient_id("person1_virus_6.jpeg") == "person1"
    assert dataset.patient_id("x/person1000_bacteria_2931.jpeg") == "person1000"
    assert dataset.patient_id("IM-0115-0001.jpeg") == "IM-0115"
    assert dataset.patient_id("IM-0491-0001-0002.jpeg") == "IM-0491"
    assert dataset.patient_id("NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"
    assert dataset.patient_id("scan.png") == "scan"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_grouped_split_keeps_patients_together(seed):
    paths, labels = dataset.list_labelled(TINY / "train")
    tr, va = dataset.grouped_split(paths, labels, 0.25, seed)
    assert sorted(tr + va) == list(range(len(paths)))
    ptr = {dataset.patient_id(paths[i]) for i in tr}
    pva = {dataset.patient_id(paths[i]) for i in va}
    assert not ptr & pva
    assert {labels[i] for i in va} == {0, 1}  # stratified: both classes in validation
    multi = [p for p in ptr | pva if sum(dataset.patient_id(q) == p for q in paths) > 1]
    assert len(multi) >= 6  # the test data really has patients with several images


def test_training_split_file_has_no_patient_on_both_sides(trained_run):
    rows = list(csv.DictReader(open(trained_run[0] / "val_split.csv")))
    train = {r["patient"] for r in rows if r["split"] == "train"}
    val = {r["patient"] for r in rows if r["split"] == "val"}
    assert val and train and not train & val
    assert len(rows) == 48
