"""A DVC remote on an S3-compatible server on loopback (moto's server mode): a successful run
pushes every dataset and model; a fresh clone of the run's commit pulls them back."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import BIN, build_workspace, git_commit, run_tool
from tests.prefect_server import free_port, wait_until

pytestmark = pytest.mark.integration

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "synthloop-test",
    "AWS_SECRET_ACCESS_KEY": "synthloop-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def up() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 60, "the S3 server")
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )
        s3.create_bucket(Bucket="synthloop")
        yield url, s3
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def digests(root: Path, folders: list[str]) -> dict[str, str]:
    found = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.mark.long
def test_a_run_pushes_to_the_remote_and_a_fresh_clone_pulls_it_back(
    tmp_path, s3_endpoint, prefect_api, monkeypatch
):
    from flows.closed_loop import closed_loop

    url, s3 = s3_endpoint
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    ws = build_workspace(tmp_path / "ws", git=True)
    # What a user does once: a default remote (the raw data is already under DVC).
    run_tool("dvc", "remote", "add", "-d", "storage", "s3://synthloop/dvc", cwd=ws)
    run_tool("dvc", "remote", "modify", "storage", "endpointurl", url, cwd=ws)
    git_commit(ws, "DVC remote")

    result = closed_loop(params_path=str(ws / "params.yaml"))
    assert result["passed"]
    version = result["version"]
    assert version["dvc_remote"] == "storage"
    commit = version["git"]["commit"]
    stored = s3.list_objects_v2(Bucket="synthloop", Prefix="dvc/")
    assert stored["KeyCount"] > 10  # the pushed datasets and models

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
    pulled = run_tool("dvc", "pull", cwd=clone)

    # Every dataset and model of the run came back, byte for byte.
    folders = [
        "data/raw/shapes",
        "data/ingested",
        "data/clean",
        "data/augmented",
        "data/fused",
        "data/synthetic",
        "data/accepted",
        "data/pool",
        "models/evaluator",
        "models/generator",
    ]
    original = digests(ws, folders)
    assert digests(clone, folders) == original, pulled.stdout + pulled.stderr
    assert any(p.startswith("data/pool/part-") and p.endswith("-r01.parquet") for p in original)
    assert (clone / "reports/validation.json").read_text() == (
        ws / "reports/validation.json"
    ).read_text()

    # DVC sees the same state in the clone as in the workspace: nothing missing. (After a
    # promotion the pool is newer than the fused set: that is the next run's input.)
    def status(root: Path) -> dict:
        return json.loads(run_tool("dvc", "status", "--json", cwd=root).stdout)

    assert status(clone) == status(ws)
    assert "deleted" not in json.dumps(status(clone))
    assert "in sync" in run_tool("dvc", "status", "--cloud", cwd=clone).stdout
