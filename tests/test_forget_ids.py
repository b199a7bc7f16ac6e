"""core.forget_ids: the one forget-id parser of the CLI (`--ids FILE`) and the dashboard's Forget set page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.forget_ids import (
    MAX_BYTES,
    ForgetIdsError,
    parse_forget_ids,
    parse_forget_ids_file,
    read_forget_ids,
    read_forget_ids_file,
)


def dashboard_file(dataset: str, ids: list[int]) -> str:
    """Exactly what dashboard/app_pages/forget_set.py offers for download."""
    return json.dumps({"dataset": dataset, "split": "train", "ids": sorted(ids)}, indent=1)


# ------------------------------------------------------------------ accepted


@pytest.mark.parametrize("text,ids", [
    ("[3, 17, 42]", [3, 17, 42]),
    ("[42, 3]", [42, 3]),                                            # file order is kept
    ('{"forget_ids": [5, 0]}', [5, 0]),
    ('{"ids": [7]}', [7]),
    ("3\n17\n42\n", [3, 17, 42]),
    ("# my forget set\n3\n\n  17  # a shirt\n\n42", [3, 17, 42]),     # blank lines and comments
    ("3, 17,42\n5", [3, 17, 42, 5]),                                 # commas
    ("3 17\t42", [3, 17, 42]),
    ("7", [7]),
    ("\ufeff[1, 2]", [1, 2]),                                        # a BOM from a Windows editor
    (b"\xef\xbb\xbf1\r\n2\r\n", [1, 2]),
    (b"[0]", [0]),
])
def test_accepted_forms(text: str | bytes, ids: list[int]) -> None:
    assert parse_forget_ids(text) == ids


def test_the_dashboards_saved_file_names_its_dataset() -> None:
    parsed = parse_forget_ids_file(dashboard_file("fashion-mnist", [9, 2]))
    assert parsed.ids == [2, 9] and parsed.dataset == "fashion-mnist"
    assert parsed.ids_for("fashion-mnist") == [2, 9]
    assert parsed.ids_for(None) == [2, 9]
    assert parse_forget_ids(dashboard_file("fashion-mnist", [4]), dataset="fashion-mnist") == [4]
    with pytest.raises(ForgetIdsError, match="lists ids of dataset 'cifar10', but this run uses 'fashion-mnist'"):
        parse_forget_ids(dashboard_file("cifar10", [4]), "forget_set.json", dataset="fashion-mnist")


def test_files_without_a_dataset_fit_any_dataset() -> None:
    assert parse_forget_ids_file("[1]").dataset is None
    assert parse_forget_ids("1\n2", dataset="cifar10") == [1, 2]


def test_a_run_json_can_serve_as_an_id_list() -> None:
    """run.json records forget_ids and the dataset card: its ids can be asked for again elsewhere."""
    meta = {"run_id": "r", "forget_ids": [3, 1], "all_forget_ids": [1, 2, 3], "dataset": {"name": "fashion-mnist"}}
    parsed = parse_forget_ids_file(json.dumps(meta))
    assert parsed.ids == [3, 1] and parsed.dataset == "fashion-mnist"


def test_read_from_disk(tmp_path: Path) -> None:
    (tmp_path / "ids.json").write_text(dashboard_file("fashion-mnist", [5, 6]))
    (tmp_path / "ids.txt").write_text("5\n6\n")
    assert read_forget_ids(tmp_path / "ids.json", dataset="fashion-mnist") == [5, 6]
    assert read_forget_ids(str(tmp_path / "ids.txt")) == [5, 6]
    assert read_forget_ids_file(tmp_path / "ids.txt").source == str(tmp_path / "ids.txt")


# ------------------------------------------------------------------ refused


@pytest.mark.parametrize("text,match", [
    ("", "holds no ids"),
    ("  \n\n# only a comment\n", "holds no ids"),
    ("[]", "holds no ids"),
    ('{"ids": []}', "holds no ids"),
    ("[1, 2.5]", "2.5, which is not a non-negative integer id .write whole"),
    ("[1, 3.0]", "3.0, which is not a non-negative integer id"),
    ("[true, 2]", "true, which is not a non-negative integer id"),
    ('["4"]', '"4", which is not a non-negative integer id'),
    ("[null]", "null, which is not a non-negative integer id"),
    ("[[1]]", "not a non-negative integer id"),
    ("[-3]", "-3, which is not a non-negative integer id: ids start at 0"),
    ("3\n-4\n", "line 2: -4 is not a non-negative integer id: ids start at 0"),
    ("3\nseven\n", "line 2: 'seven' is not a non-negative integer id"),
    ("1.5\n", "line 1: '1.5' is not a non-negative integer id"),
    ("3\n0x10\n", "'0x10' is not a non-negative integer id"),
    ("[1, 2", "not valid JSON"),
    ("{ids: [1]}", "not valid JSON"),
    ('{"ids": 5}', "must be a JSON list of ids"),
    ('{"ids": {"a": 1}}', "must be a JSON list of ids"),
    ('{"images": [1]}', "needs exactly one of 'ids' or 'forget_ids'"),
    ('{"ids": [1], "forget_ids": [2]}', "both 'ids' and 'forget_ids'"),
    ('{"ids": [1], "split": "test"}', "only training images can be forgotten"),
    ('{"ids": [1], "dataset": 7}', "'dataset' in the id list must be a dataset name"),
    ("[1, 2, 1]", "id.s. 1 more than once"),
    ("4\n4\n", "id.s. 4 more than once"),
    (b"\xff\xfe1\x002\x00", "not UTF-8 text"),
])
def test_refused_with_what_to_do(text: str | bytes, match: str) -> None:
    with pytest.raises(ForgetIdsError, match=match):
        parse_forget_ids(text)


def test_errors_are_value_errors_naming_the_source() -> None:
    with pytest.raises(ValueError, match="^forget_set.json line 1"):
        parse_forget_ids("x", "forget_set.json")


def test_huge_input_is_refused_before_parsing(tmp_path: Path) -> None:
    text = "1\n" * (MAX_BYTES // 2 + 1)
    with pytest.raises(ForgetIdsError, match="more than the 5,000,000 an id list may have"):
        parse_forget_ids(text)
    big = tmp_path / "big.txt"
    big.write_text(text)
    with pytest.raises(ForgetIdsError, match="is it the right file"):
        read_forget_ids(big)


def test_files_that_are_not_there(tmp_path: Path) -> None:
    with pytest.raises(ForgetIdsError, match="does not exist; check the path"):
        read_forget_ids(tmp_path / "nope.json")
    with pytest.raises(ForgetIdsError, match="is not a file"):
        read_forget_ids(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ForgetIdsError, match="holds no ids"):
        read_forget_ids(tmp_path / "empty.txt")


# ------------------------------------------------------------------ the CLI


def test_cli_refuses_a_dashboard_file_of_another_dataset(run_cli, write_idx_dir, tiny_model, tmp_path: Path) -> None:
    """`unlearn --ids` reads the dashboard's saved file and checks its dataset before any model work.

    The same file for the matching dataset starts a real run in
    tests/test_cli.py::test_unlearn_chain_with_parent (slow)."""
    from core.models import save_model

    save_model(tiny_model, tmp_path / "m", {"arch": "resnet18_narrow", "dataset": "fashion-mnist",
                                           "class_names": [str(i) for i in range(10)], "input_shape": [1, 28, 28]})
    ids = tmp_path / "forget_set.json"
    ids.write_text(dashboard_file("cifar10", [1, 2]))
    proc = run_cli("unlearn", "--method", "neggrad", "--ids", str(ids), "--model", str(tmp_path / "m.json"),
                   "--data-dir", str(write_idx_dir()), "--runs-dir", str(tmp_path / "runs"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: {ids} lists ids of dataset 'cifar10', but this run uses 'fashion-mnist'; use a list "
                     "made for 'fashion-mnist' or pick the matching dataset"], proc.stderr
