"""The ``crgate`` command line: transcode, inspect and synth, through typer's CliRunner
(in-process) and, for the entry point, the installed console script.

Every failure must end as one ``error:`` line on stderr naming the file (for file errors) and
the reason, with a non-zero exit code (the codes of services/core/errors.py), and must never
leave partial output behind. Inputs come from pydicom's bundled test files (no downloads).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.data
import pytest
from typer.testing import CliRunner, Result

from services.cli import app, common

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
CRGATE = Path(sys.executable).parent / "crgate"

J2K = "1.2.840.10008.1.2.4.91"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
JSON_KEYS = {
    "source",
    "input_sop_instance_uid",
    "output_sop_instance_uid",
    "target_cr",
    "achieved_cr",
    "psnr_db",
    "ssim",
    "max_abs_error",
    "bytes_in",
    "bytes_out",
    "total_ms",
    "output",
}

# Exit codes documented in services/core/errors.py.
EXIT_INVALID_INPUT = 2
EXIT_CODEC = 3
EXIT_OUTPUT = 5

runner = CliRunner()


# --------------------------------------------------------------------------- helpers


def bundled(name: str) -> Path:
    """A bundled pydicom test file; never downloads."""
    found = pydicom.data.get_testdata_file(name, download=False)
    assert found is not None, f"pydicom test file {name} is not bundled"
    return Path(str(found))


def copy_bundled(name: str, folder: Path, as_name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (as_name or name)
    shutil.copyfile(bundled(name), target)
    return target


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_fails(
    result: Result, *reasons: str, names: Sequence[str | Path] = (), code: int | None = None
) -> str:
    """A clean failure: non-zero exit, no traceback, exactly one ``error:`` line that names
    each of ``names`` and contains each of ``reasons`` (case-insensitive). Returns the line."""
    assert result.exit_code != 0, f"expected a failure, got exit 0:\n{result.output}"
    assert isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}"
    )
    if code is not None:
        assert result.exit_code == code, result.output
    errors = error_lines(result)
    assert len(errors) == 1, f"expected one error line, stderr was:\n{result.stderr}"
    line = errors[0]
    for name in names:
        assert str(name) in line, f"{name} not named in {line!r}"
    for reason in reasons:
        assert reason.lower() in line.lower(), f"{reason!r} not in {line!r}"
    return line


def assert_ok(result: Result) -> None:
    assert result.exception is None, (
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}"
    )
    assert result.exit_code == 0, result.output
    assert not error_lines(result), result.stderr


def json_records(stdout: str) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in lines(stdout)]
    assert all(isinstance(r, dict) for r in records)
    return records


def all_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, hidden ones included."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def table_cells(stdout: str) -> list[dict[str, str]]:
    """Rows of a rich table as {header: cell}, from the box-drawing characters."""
    header: list[str] | None = None
    rows: list[dict[str, str]] = []
    for line in stdout.splitlines():
        if "┃" in line and header is None:
            header = [c.strip() for c in line.strip().strip("┃").split("┃")]
        elif "│" in line and header is not None:
            cells = [c.strip() for c in line.strip().strip("│").split("│")]
            rows.append(dict(zip(header, cells, strict=False)))
    assert header is not None, f"no table header in:\n{stdout}"
    return rows


def key_values(stdout: str) -> dict[str, str]:
    """inspect's two-column table as {attribute: value} (first line of folded values)."""
    table: dict[str, str] = {}
    for line in stdout.splitlines():
        if line.count("│") >= 3:
            key, value = (c.strip() for c in line.strip().strip("│").split("│")[:2])
            if key:
                table[key] = value
    return table


@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """The transcode table is wide; give it room regardless of the terminal pytest runs in
    (test_table_is_readable_on_a_narrow_terminal covers narrow terminals)."""
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(common.out, "width", 250, raising=False)


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["transcode", "inspect", "synth"]),
        (["transcode"], ["--cr", "--out-dir", "--output", "-o", "--syntax", "--json"]),
        (["inspect"], ["--json"]),
        (["synth"], ["--out-dir", "--studies", "--size", "--seed"]),
    ],
    ids=["app", "transcode", "inspect", "synth"],
)
def test_help(command: list[str], expected: list[str]) -> None:
    result = invoke(*command, "--help")
    assert_ok(result)
    assert "Usage" in result.stdout
    for word in expected:
        assert word in result.stdout, f"{word} missing from help:\n{result.stdout}"


# --------------------------------------------------------------------------- transcode


def test_transcode_writes_j2k_named_by_output_uid(tmp_path: Path, wide_console: None) -> None:
    out_dir = tmp_path / "out"
    source = bundled("CT_small.dcm")
    result = invoke("transcode", source, "--cr", "10", "--out-dir", out_dir)
    assert_ok(result)

    written = all_files(out_dir)
    assert len(written) == 1
    ds = pydicom.dcmread(written[0])
    assert written[0].name == f"{ds.SOPInstanceUID}.dcm"
    assert ds.file_meta.TransferSyntaxUID == J2K
    assert ds.SOPInstanceUID != pydicom.dcmread(source).SOPInstanceUID  # lossy: a new instance
    assert ds.pixel_array.shape == (128, 128)

    rows = table_cells(result.stdout)
    assert len(rows) == 1, result.stdout
    row = rows[0]
    assert row["file"] == "CT_small.dcm"
    assert row["output SOP UID"] == str(ds.SOPInstanceUID)
    assert float(row["target CR"]) == 10
    assert float(row["achieved CR"].split()[0]) == pytest.approx(10, rel=0.05)


def test_transcode_json_lines(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    source = bundled("CT_small.dcm")
    result = invoke("transcode", source, "--cr", "10", "--out-dir", out_dir, "--json")
    assert_ok(result)

    records = json_records(result.stdout)
    assert len(records) == 1
    record = records[0]
    assert record.keys() >= JSON_KEYS
    assert record["source"] == str(source)
    assert record["input_sop_instance_uid"] == str(pydicom.dcmread(source).SOPInstanceUID)
    assert record["target_cr"] == 10
    assert record["achieved_cr"] == pytest.approx(record["bytes_in"] / record["bytes_out"])
    assert record["achieved_cr"] == pytest.approx(10, rel=0.05)
    assert record["bytes_in"] == 128 * 128 * 2
    assert 30 < record["psnr_db"] < 100
    assert 0 < record["ssim"] <= 1
    assert record["max_abs_error"] > 0
    assert record["total_ms"] > 0

    output = Path(record["output"])
    assert output.parent == out_dir
    assert output.name == f"{record['output_sop_instance_uid']}.dcm"
    ds = pydicom.dcmread(output)
    assert ds.SOPInstanceUID == record["output_sop_instance_uid"]
    assert ds.file_meta.TransferSyntaxUID == J2K
    assert all_files(out_dir) == [output]


def test_transcode_cr_1_is_lossless(tmp_path: Path) -> None:
    source = bundled("CT_small.dcm")
    result = invoke("transcode", source, "--cr", "1", "--out-dir", tmp_path, "--json")
    assert_ok(result)
    (record,) = json_records(result.stdout)
    original = pydicom.dcmread(source)
    assert record["output_sop_instance_uid"] == str(original.SOPInstanceUID)
    assert record["psnr_db"] == 100
    assert record["max_abs_error"] == 0
    ds = pydicom.dcmread(record["output"])
    assert ds.file_meta.TransferSyntaxUID == J2K_LOSSLESS
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)


@pytest.mark.parametrize(
    "name", ["MR_small.dcm", "MR_small_bigendian.dcm", "SC_rgb_rle_2frame.dcm"]
)
def test_transcode_other_inputs(tmp_path: Path, name: str) -> None:
    source = bundled(name)
    result = invoke("transcode", source, "--cr", "10", "--out-dir", tmp_path, "--json")
    assert_ok(result)
    (record,) = json_records(result.stdout)
    original = pydicom.dcmread(source)
    ds = pydicom.dcmread(record["output"])
    if record["lossless"]:  # the lossless encode fit CR 10's budget (SC_rgb_rle_2frame)
        assert record["bytes_out"] <= record["bytes_in"] / 10
        assert ds.file_meta.TransferSyntaxUID == J2K_LOSSLESS
    else:
        assert ds.file_meta.TransferSyntaxUID == J2K
    assert ds.pixel_array.shape == original.pixel_array.shape


def test_transcode_default_out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("transcode", bundled("CT_small.dcm"), "--cr", "10", "--json")
    assert_ok(result)
    (record,) = json_records(result.stdout)
    assert all_files(tmp_path / "crgate-out") == [tmp_path / record["output"]]


def test_syntax_j2k_lossless_with_cr_25_is_refused(tmp_path: Path) -> None:
    result = invoke(
        "transcode",
        bundled("CT_small.dcm"),
        "--syntax",
        "j2k-lossless",
        "--cr",
        "25",
        "--out-dir",
        tmp_path / "out",
    )
    assert_fails(result, "j2k-lossless", "25", code=EXIT_INVALID_INPUT)
    assert not (tmp_path / "out").exists()


def test_syntax_j2k_with_cr_1_is_refused(tmp_path: Path) -> None:
    result = invoke(
        "transcode",
        bundled("CT_small.dcm"),
        "--syntax",
        "j2k",
        "--cr",
        "1",
        "--out-dir",
        tmp_path / "out",
    )
    assert_fails(result, "lossless", code=EXIT_INVALID_INPUT)
    assert not (tmp_path / "out").exists()


def test_output_option_writes_exactly_that_file(tmp_path: Path) -> None:
    target = tmp_path / "result.dcm"
    result = invoke("transcode", bundled("CT_small.dcm"), "--cr", "10", "-o", target, "--json")
    assert_ok(result)
    (record,) = json_records(result.stdout)
    assert record["output"] == str(target)
    assert all_files(tmp_path) == [target]
    assert pydicom.dcmread(target).file_meta.TransferSyntaxUID == J2K


def test_output_option_with_two_inputs_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "result.dcm"
    result = invoke("transcode", bundled("CT_small.dcm"), bundled("MR_small.dcm"), "-o", target)
    assert_fails(result, "-o", code=EXIT_INVALID_INPUT)
    assert all_files(tmp_path) == []


def test_output_option_refuses_to_overwrite_the_input(tmp_path: Path) -> None:
    source = copy_bundled("CT_small.dcm", tmp_path)
    before = source.read_bytes()
    result = invoke("transcode", source, "--cr", "10", "-o", source)
    assert_fails(result, "overwrite", names=[source.name], code=EXIT_OUTPUT)
    assert source.read_bytes() == before
    assert all_files(tmp_path) == [source]


# --------------------------------------------------------------------------- bad inputs


def test_not_a_dicom_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("this is not DICOM\n")
    out_dir = tmp_path / "out"
    result = invoke("transcode", text, "--out-dir", out_dir)
    assert_fails(result, "not a DICOM", names=[text], code=EXIT_INVALID_INPUT)
    assert all_files(out_dir) == []


def test_no_meta_header_is_not_part10(tmp_path: Path) -> None:
    source = bundled("no_meta.dcm")
    result = invoke("transcode", source, "--out-dir", tmp_path)
    assert_fails(result, "not a DICOM", names=[source], code=EXIT_INVALID_INPUT)


def test_no_pixel_data(tmp_path: Path) -> None:
    source = bundled("rtplan.dcm")
    result = invoke("transcode", source, "--out-dir", tmp_path)
    assert_fails(result, "Pixel Data", names=[source], code=EXIT_INVALID_INPUT)
    assert all_files(tmp_path) == []


def test_truncated_pixel_data(tmp_path: Path) -> None:
    source = bundled("MR_truncated.dcm")
    result = invoke("transcode", source, "--out-dir", tmp_path)
    line = assert_fails(result, names=[source], code=EXIT_INVALID_INPUT)
    assert re.search(r"truncated|less than expected", line, re.IGNORECASE), line
    assert all_files(tmp_path) == []


def test_file_cut_to_half_its_bytes(tmp_path: Path) -> None:
    data = bundled("CT_small.dcm").read_bytes()
    cut = tmp_path / "half.dcm"
    cut.write_bytes(data[: len(data) // 2])
    out_dir = tmp_path / "out"
    result = invoke("transcode", cut, "--out-dir", out_dir)
    line = assert_fails(result, names=[cut])
    assert re.search(r"truncated|less than expected", line, re.IGNORECASE), line
    assert all_files(out_dir) == []


def test_file_cut_before_pixel_data_is_reported_truncated(tmp_path: Path) -> None:
    """A file cut inside its header must be called truncated, not an image without pixels."""
    data = bundled("CT_small.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:1000])
    out_dir = tmp_path / "out"
    result = invoke("transcode", cut, "--out-dir", out_dir)
    assert_fails(result, "truncated", names=[cut])
    assert all_files(out_dir) == []


def test_undecodable_syntax(tmp_path: Path) -> None:
    source = bundled("JPEG-lossy.dcm")
    result = invoke("transcode", source, "--out-dir", tmp_path)
    assert_fails(result, "decode", names=[source], code=EXIT_CODEC)
    assert all_files(tmp_path) == []


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.dcm"
    out_dir = tmp_path / "out"
    result = invoke("transcode", missing, "--out-dir", out_dir)
    assert_fails(result, "no such file", names=[missing], code=EXIT_INVALID_INPUT)
    assert all_files(out_dir) == []


@pytest.mark.parametrize(
    ("cr", "reason"),
    [
        ("0", "out of range"),
        ("-5", "out of range"),
        ("nan", "out of range"),
        ("inf", "out of range"),
        ("abc", "not a number"),
        ("1e12", "out of range"),
    ],
)
def test_bad_compression_ratio(tmp_path: Path, cr: str, reason: str) -> None:
    out_dir = tmp_path / "out"
    result = invoke("transcode", bundled("CT_small.dcm"), "--cr", cr, "--out-dir", out_dir)
    line = assert_fails(result, "compression ratio", reason, code=EXIT_INVALID_INPUT)
    assert cr in line
    assert not out_dir.exists()


def test_unwritable_out_dir(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("a regular file\n")
    out_dir = afile / "out"
    result = invoke("transcode", bundled("CT_small.dcm"), "--cr", "10", "--out-dir", out_dir)
    assert_fails(result, "cannot create", names=[out_dir], code=EXIT_OUTPUT)
    assert all_files(tmp_path) == [afile]


def test_unwritable_output_file(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("a regular file\n")
    target = afile / "out.dcm"
    result = invoke("transcode", bundled("CT_small.dcm"), "--cr", "10", "-o", target)
    assert_fails(result, "cannot write", names=[target], code=EXIT_OUTPUT)
    assert all_files(tmp_path) == [afile]


def test_unknown_syntax_is_a_usage_error() -> None:
    result = invoke("transcode", bundled("CT_small.dcm"), "--syntax", "jpeg")
    assert result.exit_code == EXIT_INVALID_INPUT
    assert isinstance(result.exception, SystemExit)
    assert "--syntax" in result.stderr


# --------------------------------------------------------------------------- batches


def test_batch_with_a_bad_file_writes_the_good_ones(tmp_path: Path, wide_console: None) -> None:
    inputs = tmp_path / "in"
    good1 = copy_bundled("CT_small.dcm", inputs)
    bad = inputs / "bad.dcm"
    bad.write_text("not DICOM\n")
    good2 = copy_bundled("MR_small.dcm", inputs)
    out_dir = tmp_path / "out"

    result = invoke("transcode", good1, bad, good2, "--cr", "10", "--out-dir", out_dir)
    assert_fails(result, "not a DICOM", names=[bad], code=EXIT_INVALID_INPUT)
    written = all_files(out_dir)
    assert len(written) == 2
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in written} == {J2K}
    assert lines(result.stderr)[-1] == f"1 of 3 file(s) failed: {bad}"
    names = {row["file"] for row in table_cells(result.stdout)}
    assert names == {good1.name, good2.name}


def test_batch_json_reports_the_error_in_line(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    good1 = copy_bundled("CT_small.dcm", inputs)
    bad = inputs / "bad.dcm"
    bad.write_text("not DICOM\n")
    good2 = copy_bundled("MR_small.dcm", inputs)
    out_dir = tmp_path / "out"

    result = invoke("transcode", good1, bad, good2, "--out-dir", out_dir, "--json")
    assert result.exit_code != 0
    records = json_records(result.stdout)
    assert [r["source"] for r in records] == [str(good1), str(bad), str(good2)]
    assert "error" in records[1] and "not a DICOM" in records[1]["error"]
    assert all(r.keys() >= JSON_KEYS for r in (records[0], records[2]))
    assert sorted(all_files(out_dir)) == sorted(Path(r["output"]) for r in (records[0], records[2]))
    assert lines(result.stderr)[-1] == f"1 of 3 file(s) failed: {bad}"


def test_a_batch_never_overwrites_its_own_outputs(tmp_path: Path) -> None:
    """Before: at CR 1 an output keeps its SOP Instance UID, so two inputs with one UID wrote
    one file, and the JSON lines listed two outputs of which one was gone."""
    first = copy_bundled("CT_small.dcm", tmp_path / "a")
    again = copy_bundled("CT_small.dcm", tmp_path / "b")  # the same instance, sent twice
    out_dir = tmp_path / "out"

    result = invoke("transcode", first, again, "--cr", "1", "--out-dir", out_dir, "--json")
    assert result.exit_code == 5, result.output
    done, refused = json_records(result.stdout)
    assert Path(done["output"]).is_file() and "error" not in done
    assert refused["source"] == str(again) and "would overwrite that of" in refused["error"]
    assert str(first) in refused["error"]
    assert all_files(out_dir) == [Path(done["output"])]
    assert lines(result.stderr)[-1] == f"1 of 2 file(s) failed: {again}"


def test_folder_is_walked_and_non_dicom_files_skipped(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    ct = copy_bundled("CT_small.dcm", inputs)
    mr = copy_bundled("MR_small.dcm", inputs / "sub" / "deeper")
    (inputs / "truth.csv").write_text("a,b\n1,2\n")
    out_dir = tmp_path / "out"

    result = invoke("transcode", inputs, "--cr", "10", "--out-dir", out_dir, "--json")
    assert_ok(result)
    records = json_records(result.stdout)
    assert sorted(r["source"] for r in records) == sorted([str(ct), str(mr)])
    assert len(all_files(out_dir)) == 2
    notes = [line for line in lines(result.stderr) if line.startswith("note:")]
    assert any("skipped 1 non-DICOM" in line for line in notes), result.stderr


def test_folder_without_dicom_files_fails(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "truth.csv").write_text("a,b\n")
    result = invoke("transcode", inputs, "--out-dir", tmp_path / "out")
    assert_fails(result, "no DICOM", code=EXIT_INVALID_INPUT)


# --------------------------------------------------------------------------- no partial output


def test_no_partial_output_after_failing_decode(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    result = invoke("transcode", bundled("JPEG-lossy.dcm"), "--out-dir", out_dir)
    assert_fails(result, names=["JPEG-lossy.dcm"], code=EXIT_CODEC)
    assert list(out_dir.iterdir()) == []


def test_no_partial_output_when_rename_fails(tmp_path: Path) -> None:
    """The destination is a folder: the temp file is written, the rename fails; it must go."""
    out_dir = tmp_path / "out"
    target = out_dir / "taken"
    target.mkdir(parents=True)
    result = invoke("transcode", bundled("CT_small.dcm"), "--cr", "10", "-o", target)
    assert_fails(result, "cannot write", names=[target], code=EXIT_OUTPUT)
    assert list(out_dir.iterdir()) == [target]
    assert list(target.iterdir()) == []


def test_no_partial_output_when_write_fails_midway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up after part of the file is written: no file and no .*.tmp remain."""

    def save_as_then_fail(self: pydicom.Dataset, fh: Any, *args: Any, **kwargs: Any) -> None:
        fh.write(b"\0" * 4096)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pydicom.Dataset, "save_as", save_as_then_fail)
    out_dir = tmp_path / "out"
    result = invoke("transcode", bundled("CT_small.dcm"), "--cr", "10", "--out-dir", out_dir)
    assert_fails(result, "No space left", code=EXIT_OUTPUT)
    assert list(out_dir.iterdir()) == []


def test_unreached_target_is_a_note_on_one_line(tmp_path: Path) -> None:
    source = copy_bundled("CT_small.dcm", tmp_path / "a-rather-long-folder-name" / "inputs")
    result = invoke("transcode", source, "--cr", "100000", "--out-dir", tmp_path / "out")
    assert_ok(result)
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, result.stderr
    assert str(source) in notes[0]
    assert "not reached" in notes[0]


def test_file_name_with_brackets_is_shown_verbatim(tmp_path: Path, wide_console: None) -> None:
    source = copy_bundled("CT_small.dcm", tmp_path, as_name="scan[red].dcm")
    result = invoke("transcode", source, "--cr", "10", "--out-dir", tmp_path / "out")
    assert_ok(result)
    assert [row["file"] for row in table_cells(result.stdout)] == ["scan[red].dcm"]


# --------------------------------------------------------------------------- inspect


def test_inspect_table() -> None:
    source = bundled("CT_small.dcm")
    result = invoke("inspect", source)
    assert_ok(result)
    info = key_values(result.stdout)
    assert info["modality"] == "CT"
    assert info["rows"] == "128"
    assert info["bits_stored"] == "16"
    assert "1.2.840.10008.1.2.1" in info["transfer_syntax"]


def test_inspect_json() -> None:
    source = bundled("CT_small.dcm")
    result = invoke("inspect", source, "--json")
    assert_ok(result)
    info = json.loads(result.stdout)
    assert isinstance(info, dict)
    assert info["modality"] == "CT"
    assert info["rows"] == 128
    assert info["columns"] == 128
    assert info["bits_stored"] == 16
    assert "1.2.840.10008.1.2.1" in info["transfer_syntax"]
    assert info["sop_instance_uid"] == str(pydicom.dcmread(source).SOPInstanceUID)


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_inspect_never_shows_patient_identity(as_json: bool) -> None:
    source = bundled("CT_small.dcm")
    ds = pydicom.dcmread(source)
    name, patient_id = str(ds.PatientName), str(ds.PatientID)
    assert name and patient_id
    result = invoke("inspect", source, *(["--json"] if as_json else []))
    assert_ok(result)
    for secret in (name, patient_id, name.replace("^", " ")):
        assert secret not in result.output


def test_inspect_not_a_dicom_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("plain text\n")
    result = invoke("inspect", text)
    assert_fails(result, "not a DICOM", names=[text], code=EXIT_INVALID_INPUT)
    assert result.stdout.strip() == ""


def test_inspect_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.dcm"
    result = invoke("inspect", missing)
    assert_fails(result, "no such file", names=[missing], code=EXIT_INVALID_INPUT)


def test_inspect_without_pixel_data_fails_after_describing(tmp_path: Path) -> None:
    source = bundled("rtplan.dcm")
    result = invoke("inspect", source)
    assert_fails(result, "Pixel Data", names=[source], code=EXIT_INVALID_INPUT)
    assert key_values(result.stdout)["modality"] == "RTPLAN"


def test_inspect_path_with_brackets(tmp_path: Path, wide_console: None) -> None:
    source = copy_bundled("CT_small.dcm", tmp_path / "d[" / "x]")  # the path holds "[/x]"
    result = invoke("inspect", source)
    assert_ok(result)
    assert key_values(result.stdout)["modality"] == "CT"
    assert "d[/x]" in result.stdout


# --------------------------------------------------------------------------- synth


def synth(out_dir: Path, *extra: str) -> Result:
    return invoke(
        "synth", "--out-dir", out_dir, "--studies", "2", "--size", "256x320", "--seed", "3", *extra
    )


def read_truth(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / "truth.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_synth_writes_studies_and_truth(tmp_path: Path) -> None:
    out_dir = tmp_path / "synth"
    result = synth(out_dir)
    assert_ok(result)
    truth = read_truth(out_dir)
    assert len(truth) == 8
    images = sorted(out_dir.rglob("*.dcm"))
    assert len(images) == 8
    assert sorted(out_dir / row["file"] for row in truth) == images
    for row in truth:
        ds = pydicom.dcmread(out_dir / row["file"])
        assert (ds.Columns, ds.Rows) == (256, 320)
        assert ds.SOPInstanceUID == row["sop_instance_uid"]
    assert str(out_dir) in result.stdout


def test_synth_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    assert_ok(synth(first))
    assert_ok(synth(second))
    truth_a, truth_b = read_truth(first), read_truth(second)
    assert truth_a == truth_b
    for row in truth_a:
        a = pydicom.dcmread(first / row["file"])
        b = pydicom.dcmread(second / row["file"])
        assert a.PixelData == b.PixelData


def test_synth_bad_size(tmp_path: Path) -> None:
    out_dir = tmp_path / "synth"
    result = invoke("synth", "--out-dir", out_dir, "--size", "abc")
    line = assert_fails(result, "abc", code=EXIT_INVALID_INPUT)
    assert re.search(r"\bsize\b", line), line
    assert all_files(tmp_path) == []


def test_synth_zero_studies(tmp_path: Path) -> None:
    """The message names the option the user typed (studies / --studies), not an internal
    argument name such as n_studies."""
    out_dir = tmp_path / "synth"
    result = invoke("synth", "--out-dir", out_dir, "--studies", "0", "--size", "256x320")
    line = assert_fails(result, code=EXIT_INVALID_INPUT)
    assert re.search(r"(?<![\w])(--)?studies\b", line), line
    assert "0" in line
    assert all_files(tmp_path) == []


def test_synth_out_dir_with_brackets(tmp_path: Path) -> None:
    out_dir = tmp_path / "s[" / "x]"  # the path holds "[/x]"
    result = invoke("synth", "--out-dir", out_dir, "--studies", "1", "--size", "256x320")
    assert_ok(result)
    assert len(read_truth(out_dir)) == 4
    assert "s[/x]" in result.stdout


# --------------------------------------------------------------------------- console script


def run_crgate(*args: str | Path, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [str(CRGATE), *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_console_script_help() -> None:
    assert CRGATE.exists(), f"{CRGATE} not installed (pip install -e .)"
    proc = run_crgate("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("transcode", "inspect", "synth"):
        assert command in proc.stdout


def test_console_script_transcode(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    proc = run_crgate(
        "transcode", bundled("CT_small.dcm"), "--cr", "10", "--out-dir", out_dir, "--json"
    )
    assert proc.returncode == 0, proc.stderr
    (record,) = json_records(proc.stdout)
    output = Path(record["output"])
    assert all_files(out_dir) == [output]
    assert pydicom.dcmread(output).file_meta.TransferSyntaxUID == J2K


def test_console_script_error_is_one_line(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("plain text\n")
    proc = run_crgate("transcode", text, "--out-dir", tmp_path / "out")
    assert proc.returncode == EXIT_INVALID_INPUT
    assert proc.stdout == ""
    stderr = lines(proc.stderr)
    assert stderr[0].startswith("error:") and str(text) in stderr[0] and "not a DICOM" in stderr[0]
    assert stderr[1:] == [f"1 of 1 file(s) failed: {text}"]


def test_table_is_readable_on_a_narrow_terminal(tmp_path: Path) -> None:
    """On an 80-column terminal the table must still show the file name and the CRs, not
    squeeze them into '…'."""
    source = bundled("CT_small.dcm")
    proc = run_crgate("transcode", source, "--cr", "10", "--out-dir", tmp_path, columns=80)
    assert proc.returncode == 0, proc.stderr
    assert len(all_files(tmp_path)) == 1
    assert "…" not in proc.stdout, proc.stdout
    assert "CT_small.dcm" in proc.stdout, proc.stdout
    assert re.search(r"\b(9\.[5-9]\d|10\.[0-4]\d)\b", proc.stdout), "achieved CR not shown"
