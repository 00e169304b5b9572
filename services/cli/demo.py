"""``crgate demo``: push a phantom study to a running crgate over C-STORE, wait for its
auto-classification at the MG policy, print the result and where the overlays are."""

from __future__ import annotations

import secrets
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from services.cli.common import fail

out = Console(soft_wrap=True)

DEMO_CR = 20.0  # the strictest of the three presets' mammography maxima above DRG's 15


def demo(
    url: Annotated[str, typer.Option(help="crgate's HTTP address")] = "http://127.0.0.1:8080",
    dicom: Annotated[
        str, typer.Option(help="crgate's DICOM address as AET@host:port")
    ] = "CRGATE@127.0.0.1:11112",
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="the server's data directory (admin.key, results)")
    ] = Path("var"),
    size: Annotated[str, typer.Option(help="phantom size WxH")] = "3328x4096",
    seed: Annotated[
        int | None, typer.Option(help="phantom seed (default: a new one, so a new study)")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the result")] = 300.0,
) -> None:
    """Push a phantom mammography study by C-STORE and show its auto-classification."""
    from services.core.errors import CrgateError
    from services.lab.phantom import PhantomConfig, parse_size, write_studies
    from services.runtime.forwarding import push

    key_file = data_dir / "admin.key"
    if not key_file.is_file():
        raise fail(f"{key_file} not found: start `crgate serve --data-dir {data_dir}` first")
    headers = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        try:
            client.get("/healthz").raise_for_status()
        except httpx.HTTPError as exc:
            raise fail(f"crgate does not answer at {url} ({exc})") from None
        policy = _ensure_mg_auto_policy(client)
        width, height = parse_size(size)
        if seed is None:  # the same seed gives the same UIDs: a study the server already has
            seed = secrets.randbelow(10**9)
        with tempfile.TemporaryDirectory(prefix="crgate-demo-") as tmp:
            try:
                write_studies(
                    Path(tmp), 1, seed=seed, config=PhantomConfig(width=width, height=height)
                )
            except CrgateError as exc:
                raise fail(str(exc), exc.exit_code) from None
            files = sorted(Path(tmp).rglob("*.dcm"))
            import pydicom

            study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            out.print(f"pushing {len(files)} images of study {study_uid} to {dicom} (C-STORE)")
            report = push(dicom, "CRGATEDEMO", files)
        if report.get("error") or report["failed"]:
            raise fail(f"C-STORE failed: {report.get('error') or report['failed']}", 5)
        out.print(
            f"waiting for the MG policy's auto-classification (CR {policy['cr']:g}, "
            f"{policy['expected_instances']} views)..."
        )
        result = _wait_result(client, study_uid, timeout)
    _print_result(result, url, data_dir)


def _ensure_mg_auto_policy(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/policies")
    response.raise_for_status()
    for policy in response.json():
        if policy["modality"] == "MG" and policy["body_part"] in ("*", "BREAST"):
            if policy["auto_classify"] and policy["expected_instances"]:
                return dict(policy)
            changed = client.put(
                f"/policies/{policy['id']}",
                json={"auto_classify": True, "expected_instances": 4},
            )
            changed.raise_for_status()
            out.print(f"demo: turned auto-classification on for policy {policy['id']} (MG)")
            return dict(changed.json())
    created = client.post(
        "/policies",
        json={"modality": "MG", "cr": DEMO_CR, "auto_classify": True, "expected_instances": 4},
    )
    if created.status_code >= 400:
        raise fail(f"cannot create the MG policy: {created.text}")
    out.print(f"demo: created an MG policy (CR {DEMO_CR:g}, auto-classify, 4 views)")
    return dict(created.json())


def _wait_result(client: httpx.Client, study_uid: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with out.status("classifying (transcode, infer, store outputs)..."):
        while time.monotonic() < deadline:
            response = client.get(f"/studies/{study_uid}/results")
            if response.status_code == 200 and response.json():
                return dict(response.json()[0])
            time.sleep(1)
    raise fail(f"no result for study {study_uid} after {timeout:g} s (see the server log)", 5)


def _print_result(result: dict[str, Any], url: str, data_dir: Path) -> None:
    model = result["model"]
    title = (
        f"{model['name']} {model['version']} at CR {result['applied_cr']:g} ({result['policy']})"
    )
    breasts = Table(title=title, title_justify="left")
    for column in ("breast", "P(malignant) at CR", "on original", "change"):
        breasts.add_column(column)
    for b in result["breasts"]:
        change = b["probability"] - b["probability_original"]
        breasts.add_row(
            b["laterality"],
            f"{b['probability']:.3f}",
            f"{b['probability_original']:.3f}",
            f"{change:+.3f}",
        )
    out.print(breasts)
    images = Table(title="images", title_justify="left")
    for column in ("SOP Instance UID", "achieved CR", "PSNR dB", "SSIM", "max err"):
        images.add_column(column)
    for i in result["images"]:
        ssim = "-" if i["ssim"] is None else f"{i['ssim']:.5f}"
        images.add_row(
            i["input_sop_instance_uid"],
            f"{i['achieved_cr']:.2f}",
            f"{i['psnr_db']:.2f}",
            ssim,
            str(i["max_abs_error"]),
        )
    out.print(images)
    base = f"{url}/studies/{result['study_uid']}/results/{result['result_id']}"
    out.print(f"result JSON: {base}")
    folder = data_dir / "results" / result["result_id"] / "overlays"
    for uid in result["overlays"]:
        out.print(f"overlay: {folder / (uid + '.png')}  ({base}/overlays/{uid}.png)")
    out.print(
        f"DICOM outputs (derived series, overlays, SR): {url}/dicomweb/studies/"
        f"{result['study_uid']}/series"
    )
