"""sarl annotate's logic without a server: the labelling configs, the tasks a push makes, what a pull merges.

The server side (projects, storages, export, the CLI's errors) is tests/integration/test_label_studio.py.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sarl.platform.annotate import (
    AnnotateError,
    Answer,
    ProjectKind,
    Scored,
    answers_from_export,
    conflicts_path,
    entries_config,
    entry_tasks,
    image_sources,
    image_tasks,
    images_config,
    merge_answers,
    parse_config,
    read_lines,
    read_suggestions,
    vocabulary_of,
)


def test_configs_name_the_controls_the_ml_backend_relies_on_and_parse_back():
    entries = ET.fromstring(entries_config())
    (answer,) = entries.iter("Choices")
    assert answer.get("name") == "answer" and answer.get("choice") == "single"
    assert [c.get("value") for c in answer.iter("Choice")] == ["present", "absent", "can't tell"]
    assert entries.find("Header").get("value") == "$category"
    assert parse_config(entries_config(), "p") == ProjectKind("entries", ())

    names = ["dog", 'say "cheese"', "a&b"]  # quoted and escaped, not broken XML
    images = ET.fromstring(images_config(names))
    (choices,) = images.iter("Choices")
    assert choices.get("name") == "categories" and choices.get("choice") == "multiple"
    assert [c.get("value") for c in choices.iter("Choice")] == names
    assert parse_config(images_config(names), "p") == ProjectKind("images", tuple(names))


@pytest.mark.parametrize("config, why", [
    ("<View><Choices name='other' toName='image'><Choice value='x'/></Choices></View>", "no Choices named"),
    ("<View><Choices name='answer' toName='image'><Choice value='yes'/></Choices></View>", "'answer' choices"),
    ("<View", "not XML"),
])
def test_a_foreign_config_is_refused_naming_the_project(config, why):
    with pytest.raises(AnnotateError, match=f"project 'birds'.*does not match the vocabulary.*{why}"):
        parse_config(config, "birds")


def test_suggestions_resolve_against_the_manifest_and_bad_rows_name_the_line(tmp_path):
    csv_file = tmp_path / "out" / "s-suggest.csv"
    csv_file.parent.mkdir()
    csv_file.write_text("path,category,score,threshold\nimg/a.png,dog,0.45,0.5\n/abs/b.png,cat,0.7,0.6\n")
    manifest = tmp_path / "data" / "train.jsonl"
    rows = read_suggestions(str(csv_file), str(manifest))
    assert rows[0] == Scored(str(manifest.parent / "img/a.png"), "dog", 0.45, 0.5)
    assert rows[1].path == "/abs/b.png" and rows[1].margin == pytest.approx(0.1)
    assert read_suggestions(str(csv_file))[0].path == str(csv_file.parent / "img/a.png")  # default: its folder

    csv_file.write_text("path,category,score,threshold\nimg/a.png,dog,high,0.5\n")
    with pytest.raises(AnnotateError, match=r"s-suggest.csv:2"):
        read_suggestions(str(csv_file))
    csv_file.write_text("path,category\nimg/a.png,dog\n")
    with pytest.raises(AnnotateError, match="lacks"):
        read_suggestions(str(csv_file))


def test_entry_tasks_come_by_margin_with_the_model_as_prediction():
    scored = [Scored("/i/a.png", "dog", 0.9, 0.5), Scored("/i/b.png", "cat", 0.48, 0.5),
              Scored("/i/a.png", "cat", 0.3, 0.5)]
    refs = {"/i/a.png": "/data/local-files/?d=i/a.png", "/i/b.png": "/data/local-files/?d=i/b.png"}
    tasks = entry_tasks(scored, refs, "model-1")
    assert [(t["data"]["path"], t["data"]["category"]) for t in tasks] == \
        [("/i/b.png", "cat"), ("/i/a.png", "cat"), ("/i/a.png", "dog")]
    first = tasks[0]
    assert first["data"] == {"image": refs["/i/b.png"], "category": "cat", "score": 0.48, "threshold": 0.5,
                             "margin": 0.02, "path": "/i/b.png"}
    (prediction,) = first["predictions"]
    assert prediction["model_version"] == "model-1" and prediction["score"] == 0.48
    assert prediction["result"] == [{"from_name": "answer", "to_name": "image", "type": "choices",
                                     "value": {"choices": ["absent"]}}]
    assert tasks[2]["predictions"][0]["result"][0]["value"]["choices"] == ["present"]


def test_image_tasks_pre_tick_what_reaches_its_threshold():
    scored = [Scored("/i/a.png", "dog", 0.9, 0.5), Scored("/i/a.png", "cat", 0.3, 0.25),
              Scored("/i/a.png", "cow", 0.1, 0.5), Scored("/i/b.png", "dog", 0.2, 0.5)]
    tasks = image_tasks(scored, ["cat", "cow", "dog"], {"/i/a.png": "A", "/i/b.png": "B"}, "m")
    assert [t["data"]["path"] for t in tasks] == ["/i/a.png", "/i/b.png"]  # a's cat is 0.05 from its threshold
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == ["cat", "dog"]
    assert tasks[0]["predictions"][0]["score"] == 0.05
    assert tasks[1]["predictions"][0]["result"] == []  # nothing ticked


def test_image_sources_serve_local_files_from_the_document_root_and_name_bad_images(tmp_path):
    root = tmp_path / "root"
    (root / "photos" / "x").mkdir(parents=True)
    image = root / "photos" / "x" / "a b.png"
    image.write_bytes(b"png")
    sources = image_sources([str(image), str(image)], str(root))
    assert sources.refs == {str(image): "/data/local-files/?d=photos/x/a%20b.png"}
    assert sources.local_dirs == {str(root / "photos")} and sources.buckets == set()

    with pytest.raises(AnnotateError, match="has gone"):
        image_sources([str(root / "photos" / "gone.png")], str(root))
    (root / "top.png").write_bytes(b"png")
    with pytest.raises(AnnotateError, match="not in a sub-folder of Label Studio's document root"):
        image_sources([str(root / "top.png")], str(root))
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"png")
    with pytest.raises(AnnotateError, match="elsewhere.png is not in a sub-folder"):
        image_sources([str(outside)], str(root))
    with pytest.raises(AnnotateError, match="--document-root"):
        image_sources([str(image)], None)


def _task(tid, path, result, category=None, when="2026-01-01T00:00:00Z", cancelled=False, user=1):
    data = {"image": "x", "path": path, **({"category": category} if category else {})}
    return {"id": tid, "data": data, "annotations": [{"id": tid * 10, "completed_by": user, "result": result,
                                                      "was_cancelled": cancelled, "updated_at": when}]}


def _answer(choice, control="answer"):
    return [{"from_name": control, "to_name": "image", "type": "choices", "value": {"choices": choice}}]


def test_answers_from_an_export_take_the_latest_submission_and_name_bad_tasks():
    entries = ProjectKind("entries", ())
    tasks = [_task(1, "/a.png", _answer(["present"]), "dog"),
             _task(2, "/a.png", _answer(["can't tell"]), "cat"),
             _task(3, "/b.png", _answer(["absent"]), "dog", cancelled=True),  # skipped: no answer
             _task(4, "/b.png", [], "cat")]  # submitted empty: no answer
    tasks[0]["annotations"].append({"id": 11, "completed_by": 2, "result": _answer(["absent"]),
                                    "updated_at": "2026-02-01T00:00:00Z"})
    answers = answers_from_export(tasks, entries, {"dog", "cat"}, {1: "ann@x", 2: "bob@x"})
    assert answers == [Answer("/a.png", "dog", 0, "bob@x", "2026-02-01T00:00:00Z", 1),
                       Answer("/a.png", "cat", -1, "ann@x", "2026-01-01T00:00:00Z", 2)]

    with pytest.raises(AnnotateError, match=r"task 7: category 'zebra' is not in the manifest's vocabulary"):
        answers_from_export([_task(7, "/a.png", _answer(["present"]), "zebra")], entries, {"dog"}, {})
    with pytest.raises(AnnotateError, match="task 8: answer"):
        answers_from_export([_task(8, "/a.png", _answer(["maybe"]), "dog")], entries, {"dog"}, {})
    with pytest.raises(AnnotateError, match="task 9 has no 'path'"):
        answers_from_export([{"id": 9, "data": {"image": "x"}, "annotations": [{"result": []}]}], entries, set(), {})

    images = ProjectKind("images", ("cat", "dog", "cow"))
    answers = answers_from_export([_task(5, "/c.png", _answer(["dog"], "categories"))], images,
                                  {"cat", "dog", "cow"}, {1: "ann@x"})
    assert {(a.category, a.state) for a in answers} == {("cat", 0), ("dog", 1), ("cow", 0)}
    with pytest.raises(AnnotateError, match="task 6: category 'zebra' is not in the project's vocabulary"):
        answers_from_export([_task(6, "/c.png", _answer(["zebra"], "categories"))], images, {"dog"}, {})


def test_merge_makes_answered_entries_known_and_reports_conflicts_without_overwriting(tmp_path):
    manifest = tmp_path / "m.jsonl"
    lines = [{"path": "a.png", "labels": ["dog"], "unknown": ["cat", "cow"],
              "entries": {"dog": {"state": 1, "source": "annotated"},
                          "cat": {"state": -1, "source": "unsure", "score": 0.48},
                          "cow": {"state": -1, "source": "unsure", "score": 0.2}}},
             {"path": "b.png", "labels": [], "unknown": ["dog"]}]  # a plain row: cat and cow are absent (annotated)
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = read_lines(str(manifest))
    assert rows[0]["entries"]["cat"]["score"] == 0.48 and "entries" not in rows[1]
    vocabulary = vocabulary_of(rows)
    assert vocabulary == ["cat", "cow", "dog"]
    answers = [Answer("/m/a.png", "cat", 1, "ann@x", "t1", 1),  # unknown -> present
               Answer("/m/a.png", "cow", -1, "ann@x", "t1", 2),  # can't tell: stays unknown
               Answer("/m/a.png", "dog", 0, "ann@x", "t1", 3),  # annotated present: conflict, kept
               Answer("/m/b.png", "dog", 0, "bob@x", "t2", 4),  # unknown -> absent
               Answer("/m/b.png", "cat", 0, "bob@x", "t2", 5)]  # agrees with the plain row
    merged, conflicts, counts = merge_answers(rows, ["/m/a.png", "/m/b.png"], answers, vocabulary)
    assert merged[0]["labels"] == ["dog", "cat"] and merged[0]["unknown"] == ["cow"]
    assert merged[0]["entries"]["cat"] == {"state": 1, "source": "annotated", "annotator": "ann@x",
                                           "annotated_at": "t1", "task": 1, "score": 0.48}
    assert merged[0]["entries"]["dog"] == {"state": 1, "source": "annotated"}
    assert merged[1]["labels"] == [] and merged[1]["unknown"] == []
    assert merged[1]["entries"]["dog"]["annotator"] == "bob@x"
    assert conflicts == [{"path": "a.png", "category": "dog", "manifest_state": 1, "annotated_state": 0,
                          "annotator": "ann@x", "annotated_at": "t1", "task": 3}]
    assert counts == {"answers": 5, "became_known": 2, "cant_tell": 1, "agreed": 1, "conflicts": 1}

    # pulling the same answers into the merged manifest changes nothing and reports no new conflict but the old one
    again, conflicts_again, counts_again = merge_answers(merged, ["/m/a.png", "/m/b.png"], answers, vocabulary)
    assert again == merged and counts_again["became_known"] == 0 and len(conflicts_again) == 1


def test_the_cli_lists_push_and_pull(capsys):
    from sarl.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["annotate", "pull", "--label-studio", "http://x", "--project", "p", "--manifest",
                              "m.jsonl", "--output", "o.jsonl"])
    assert args.annotate_command == "pull" and args.project == "p"
    assert Path(args.output).name == "o.jsonl"


def test_the_conflict_report_lies_beside_the_output():
    assert conflicts_path("/data/m2.jsonl") == "/data/m2-conflicts.csv"
    assert conflicts_path("s3://bucket/round 1/m2.jsonl") == "s3://bucket/round 1/m2-conflicts.csv"
