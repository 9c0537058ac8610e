"""Instruction tasks built from hand-made studies: answers, options, determinism, mixing."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from cxrlite.data.labels import (
    CHEXPERT_OBSERVATIONS,
    NEGATIVE,
    NOT_MENTIONED,
    POSITIVE,
    UNCERTAIN,
    Consolidation,
    Edema,
    Effusion,
    Nodule,
    Pneumothorax,
    StudyLabels,
)
from cxrlite.data.prompts import CHECKLIST_TERMS, FINDINGS_PROMPTS
from cxrlite.data.records import Study, TaskRecord
from cxrlite.data.tasks import (
    NONE_OF_THESE,
    OBSERVATION_TERMS,
    TASKS,
    build_tasks,
    findings_answer,
    findings_checklist,
    holdout,
    read_tasks,
    task_mix,
    word_difference,
    write_tasks,
)
from cxrlite.eval.labeler import label_report

TERM_TO_OBS = {term: obs for obs, term in OBSERVATION_TERMS.items()}


def _chexpert(**values: str) -> dict[str, str]:
    labels = {obs: NOT_MENTIONED for obs in CHEXPERT_OBSERVATIONS}
    labels.update({k.replace("_", " "): v for k, v in values.items()})
    return labels


def _sick_phantom(study_id: str = "ph-sick") -> Study:
    truth = StudyLabels(
        view="AP",
        sex="F",
        age=71,
        ctr=0.58,
        effusion=Effusion("left", "moderate"),
        pneumothorax=Pneumothorax("right", "small"),
        consolidation=Consolidation("right lower lobe"),
        nodule=Nodule("right", "upper", 12),
        edema=Edema("mild"),
    )
    chexpert = _chexpert(
        Cardiomegaly=POSITIVE,
        Pleural_Effusion=POSITIVE,
        Pneumothorax=POSITIVE,
        Consolidation=POSITIVE,
        Edema=UNCERTAIN,  # never asked yes/no
        Atelectasis=NEGATIVE,
        Fracture=NEGATIVE,
    )
    return Study(study_id, f"images/{study_id}.png", "train", "phantom",
                 findings="Enlarged heart. Moderate left pleural effusion.",
                 impression="Cardiomegaly, left effusion, right pneumothorax.",
                 chexpert=chexpert, view="AP", sex="F", age=71, labels=truth)  # fmt: skip


# The statements that are true of _sick_phantom(), in the builder's noun-phrase wording.
SICK_TRUE = {
    "AP view", "enlarged cardiac silhouette", "left pleural effusion", "moderate pleural effusion",
    "right pneumothorax", "small pneumothorax", "right lower lobe consolidation",
    "mild pulmonary edema", "right lung nodule",
}  # fmt: skip


def _normal_study() -> Study:
    negatives = {o.replace(" ", "_"): NEGATIVE for o in CHEXPERT_OBSERVATIONS[1:]}
    chexpert = _chexpert(No_Finding=POSITIVE, **negatives)
    chexpert["Support Devices"] = NOT_MENTIONED
    return Study("cxp-normal", "/data/n.jpg", "validate", "chexpert", view="PA", chexpert=chexpert)


def _uncertain_study() -> Study:
    chexpert = _chexpert(Edema=UNCERTAIN, Pleural_Effusion=UNCERTAIN)
    return Study("mimic-unc", "/data/u.jpg", "test", "mimic-cxr-jpg", findings="Hazy.",
                 impression=None, chexpert=chexpert, view="LATERAL")  # fmt: skip


def _by_task(records: list[TaskRecord]) -> dict[str, list[TaskRecord]]:
    out: dict[str, list[TaskRecord]] = {}
    for r in records:
        out.setdefault(r.task, []).append(r)
    return out


def test_every_record_is_well_formed():
    studies = [_sick_phantom(), _normal_study(), _uncertain_study()]
    records = build_tasks(studies, seed=3)
    by_study = {s.id: s for s in studies}
    assert len({r.id for r in records}) == len(records)
    for r in records:
        study_id, task, k = r.id.rsplit(":", 2)
        study = by_study[study_id]
        assert task == r.task and k.isdigit()
        assert (r.split, r.source) == (study.split, study.source)
        expected_images = [] if r.task == "findings_summarization" else [study.image]
        assert r.images == expected_images
        if r.options is not None:
            assert r.answer in r.options and len(set(r.options)) == len(r.options)
            assert r.prompt.endswith("Options: " + "; ".join(r.options))
    counts = Counter(r.task for r in records if r.id.startswith("ph-sick:"))
    assert counts == {
        "findings_generation": 1, "impression_generation": 1, "findings_summarization": 1,
        "view_classification": 1, "binary_disease_classification": 2,
        "single_disease_identification": 1, "multi_disease_identification": 1,
        "location_vqa": 4, "severity_vqa": 3, "image_text_reasoning": 2,
    }  # fmt: skip


def test_report_text_tasks():
    study = _sick_phantom()
    tasks = _by_task(build_tasks([study, _normal_study()]))
    (gen,) = tasks["findings_generation"]
    checklist = "Cardiomegaly. Pleural effusion. Pneumothorax. Consolidation. Possible edema."
    assert gen.answer == f"{checklist} {study.findings}"
    assert gen.prompt in FINDINGS_PROMPTS and gen.options is None
    (imp,) = tasks["impression_generation"]
    assert imp.answer == study.impression
    (summary,) = tasks["findings_summarization"]
    assert gen.answer in summary.prompt and summary.answer == study.impression
    assert summary.images == []


def test_findings_checklist_states_each_core_finding_as_labelled():
    assert findings_checklist(_normal_study()) == (
        "No cardiomegaly. No pleural effusion. No pneumothorax. No consolidation. No edema."
    )
    # Findings the labels do not mention are left out, not stated absent.
    assert findings_checklist(_uncertain_study()) == "Possible pleural effusion. Possible edema."
    assert findings_answer(_uncertain_study()) == "Possible pleural effusion. Possible edema. Hazy."


def test_report_labeler_reads_the_checklist_as_its_labels():
    for study in (_sick_phantom(), _normal_study(), _uncertain_study()):
        read = label_report(findings_checklist(study))
        for obs in CHECKLIST_TERMS:
            stated = study.chexpert[obs]
            assert read[obs] == stated, (obs, stated, read[obs])


def test_view_classification_only_for_frontal_views():
    tasks = _by_task(build_tasks([_sick_phantom(), _normal_study(), _uncertain_study()]))
    answers = {r.id.split(":")[0]: r.answer for r in tasks["view_classification"]}
    assert answers == {"ph-sick": "AP", "cxp-normal": "PA"}
    assert all(r.options == ["PA", "AP"] for r in tasks["view_classification"])


def _asked_observation(prompt: str) -> str:
    term = re.match(r"Does this chest X-ray show (.+)\?\n", prompt).group(1)
    return TERM_TO_OBS[term]


def test_binary_questions_follow_labels_and_skip_uncertain():
    studies = [_sick_phantom(), _normal_study(), _uncertain_study()]
    for seed in range(20):
        records = build_tasks(studies, seed=seed, tasks=["binary_disease_classification"])
        per_study = Counter(r.id.split(":")[0] for r in records)
        assert per_study == {"ph-sick": 2, "cxp-normal": 1}  # the uncertain study gets none
        for r in records:
            study = next(s for s in studies if r.id.startswith(s.id + ":"))
            label = study.chexpert[_asked_observation(r.prompt)]
            assert r.options == ["yes", "no"]
            assert (r.answer, label) in {("yes", POSITIVE), ("no", NEGATIVE)}
        sick = sorted(r.answer for r in records if r.id.startswith("ph-sick:"))
        assert sick == ["no", "yes"]  # one of each when both kinds of label exist


def test_single_disease_identification():
    study = _sick_phantom()
    for seed in range(10):
        (r,) = build_tasks([study], seed=seed, tasks=["single_disease_identification"])
        assert study.chexpert[TERM_TO_OBS[r.answer]] == POSITIVE
        others = [TERM_TO_OBS[o] for o in r.options if o != r.answer]
        assert len(others) == 2 and all(study.chexpert[o] == NEGATIVE for o in others)
    assert build_tasks([_normal_study()], tasks=["single_disease_identification"]) == []


def _terms(option: str) -> set[str]:
    return set() if option == NONE_OF_THESE else set(option.split(", "))


def test_multi_disease_identification_answer_is_the_exact_set():
    for study in (_sick_phantom(), _normal_study()):
        for seed in range(10):
            (r,) = build_tasks([study], seed=seed, tasks=["multi_disease_identification"])
            panel = re.match(r".*chest X-ray: (.+)\?\n", r.prompt).group(1).split(", ")
            assert 2 <= len(panel) <= 4
            truth = {t for t in panel if study.chexpert[TERM_TO_OBS[t]] == POSITIVE}
            assert _terms(r.answer) == truth
            assert [_terms(o) == truth for o in r.options].count(True) == 1
            assert all(_terms(o) <= set(panel) for o in r.options)
    (normal,) = build_tasks([_normal_study()], tasks=["multi_disease_identification"])
    assert normal.answer == NONE_OF_THESE


def test_location_and_severity_vqa_match_structured_truth():
    tasks = _by_task(build_tasks([_sick_phantom(), _normal_study()], seed=5))
    location = {r.prompt.split("\n")[0]: (r.answer, r.options) for r in tasks["location_vqa"]}
    assert location["Which side is the pleural effusion on?"] == (
        "left",
        ["left", "right", "bilateral"],
    )
    assert location["Which side is the pneumothorax on?"] == ("right", ["left", "right"])
    assert location["Which lung is the nodule in?"][0] == "right"
    lobe, lobe_options = location["Which lobe is the consolidation in?"]
    assert lobe == "right lower lobe" and len(lobe_options) == 4
    severity = {r.prompt.split("\n")[0]: r.answer for r in tasks["severity_vqa"]}
    assert severity == {
        "How large is the pleural effusion?": "moderate",
        "How large is the pneumothorax?": "small",
        "How severe is the pulmonary edema?": "mild",
    }
    # Real datasets have no structured truth: no laterality/severity/reasoning questions.
    assert all(r.source == "phantom" for r in tasks["location_vqa"] + tasks["severity_vqa"])


def test_image_text_reasoning_hard_negatives_differ_in_one_word():
    seen_true = set()
    for seed in range(40):
        records = build_tasks([_sick_phantom()], seed=seed, tasks=["image_text_reasoning"])
        assert len(records) == 2
        for r in records:
            a, b = r.options
            assert word_difference(a, b) == 1
            assert [o in SICK_TRUE for o in r.options].count(True) == 1
            assert r.answer in SICK_TRUE
            seen_true.add(r.answer)
    # Present findings come first, so every finding-specific statement shows up over seeds.
    assert seen_true == SICK_TRUE - {"AP view", "enlarged cardiac silhouette"}
    bilateral = _sick_phantom("ph-bi")
    bilateral.labels = StudyLabels(view="PA", sex="M", age=40, ctr=0.4,
                                   effusion=Effusion("bilateral", "small"))  # fmt: skip
    options = {
        tuple(sorted(r.options))
        for seed in range(30)
        for r in build_tasks([bilateral], seed=seed, tasks=["image_text_reasoning"])
    }
    assert ("bilateral pleural effusion", "unilateral pleural effusion") in options
    assert word_difference("right lower lobe", "left lower lobe") == 1
    assert word_difference("lingula", "left lower lobe") is None


def test_determinism_and_independence_from_other_studies():
    studies = [_sick_phantom(), _normal_study(), _uncertain_study()]
    first = [r.to_dict() for r in build_tasks(studies, seed=11)]
    assert first == [r.to_dict() for r in build_tasks(studies, seed=11)]
    assert first != [r.to_dict() for r in build_tasks(studies, seed=12)]
    alone = [r.to_dict() for r in build_tasks([studies[1]], seed=11)]
    assert alone == [r for r in first if r["id"].startswith("cxp-normal:")]


def test_phantom_without_chexpert_uses_the_truth_its_report_states():
    from cxrlite.phantoms.reports import chexpert_truth

    study = _sick_phantom("ph-nolabels")
    study.chexpert = {}
    truth = chexpert_truth(study.labels)
    records = build_tasks([study], tasks=["binary_disease_classification"])
    assert len(records) == 2
    for r in records:
        expected = {"yes": POSITIVE, "no": NEGATIVE}[r.answer]
        assert truth[_asked_observation(r.prompt)] == expected


def test_bad_task_names_and_duplicate_ids():
    with pytest.raises(ValueError, match="unknown tasks \\['caption'\\]"):
        build_tasks([_normal_study()], tasks=["caption"])
    with pytest.raises(ValueError, match="duplicate study id 'cxp-normal'"):
        build_tasks([_normal_study(), _normal_study()])
    assert set(TASKS) >= {"findings_generation", "image_text_reasoning", "location_vqa"}


def _records(task: str, source: str, n: int) -> list[TaskRecord]:
    return [
        TaskRecord(f"{task}-{source}-{i}", task, [], "q", "a", "train", source) for i in range(n)
    ]


def test_task_mix_hits_ratios_and_upsamples():
    records = _records("a", "mimic", 100) + _records("b", "chexpert", 30) + _records("c", "iu", 10)
    mixed = task_mix(records, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=1, total=200)
    assert Counter(r.task for r in mixed) == {"a": 100, "b": 60, "c": 40}
    assert set(Counter(r.id for r in mixed if r.task == "c").values()) == {4}
    assert Counter(r.id for r in mixed if r.task == "a").most_common(1)[0][1] == 1
    again = task_mix(records, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=1, total=200)
    assert [r.id for r in again] == [r.id for r in mixed]
    assert mixed != task_mix(records, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=2, total=200)
    # Default size: all records of the weighted groups; unweighted groups drop out.
    by_source = task_mix(records, {"mimic": 4, "iu": 1}, by="source")
    assert Counter(r.source for r in by_source) == {"mimic": 88, "iu": 22}
    thirds = task_mix(records, {"a": 1, "b": 1, "c": 1}, total=100)
    assert sorted(Counter(r.task for r in thirds).values()) == [33, 33, 34]
    with pytest.raises(ValueError, match=r"no records for task \['d'\]"):
        task_mix(records, {"a": 1, "d": 1})
    with pytest.raises(ValueError, match="non-negative"):
        task_mix(records, {"a": -1})


def test_holdout_and_jsonl_round_trip(tmp_path):
    records = build_tasks([_sick_phantom(), _normal_study()], seed=0)
    kept, held = holdout(records, tasks=["view_classification"], sources=["chexpert"])
    assert len(kept) + len(held) == len(records)
    assert not any(r.task == "view_classification" or r.source == "chexpert" for r in kept)
    assert all(r.task == "view_classification" or r.source == "chexpert" for r in held)
    assert any(r.source == "phantom" for r in held)
    path = tmp_path / "tasks.jsonl"
    assert write_tasks(path, records) == len(records)
    assert read_tasks(path) == records
    path.write_text('{"id": "x", "task": "t", "images": [], "prompt": "q", "answer": "z",'
                    ' "split": "train", "source": "s", "options": ["a", "b"]}\n')  # fmt: skip
    with pytest.raises(ValueError, match="tasks.jsonl: record 1: .*not among its options"):
        read_tasks(path)
