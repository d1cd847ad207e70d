"""FID / IS / KID on Ray against torch-fidelity's calculate_metrics, on the same images and
the same (random) InceptionV3 weights file; statistics merging; .npz files; error paths."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sdbatch import inception, metrics
from sdbatch.jobs import metrics as metrics_job
from sdbatch.jobs.cli import main
from conftest import set_env

N_GEN, N_REF = 12, 10
OPTS = dict(isc_splits=3, kid_subsets=10, kid_subset_size=6, rng_seed=2020)
# float32 convolutions round differently with the batch size and the thread count (~1e-6
# relative on logits), in torch-fidelity as here: both sides extract one image at a time on
# one thread, so that any difference left comes from the metrics' own arithmetic.
CLI_OPTS = ["--isc-splits", "3", "--kid-subsets", "10", "--kid-subset-size", "6", "--batch-size", "1",
            "--threads", "1"]
REF_NPZ = "s3://metrics/ref.npz"  # written by the `runs` fixture
KEYS = ("frechet_inception_distance", "inception_score_mean", "inception_score_std",
        "kernel_inception_distance_mean", "kernel_inception_distance_std")


def _image(rng: np.random.Generator, kind: str) -> np.ndarray:
    if kind == "noise":
        return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    y, x = np.mgrid[0:32, 0:32] / 31
    a, b, c = rng.random((3, 3)) * 3
    return (np.stack([a[i] * x + b[i] * y + c[i] for i in range(3)], -1) % 1 * 255).astype(np.uint8)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """gen: a job OUT (images/ + manifest/) of noise and colour-ramp images, and a copy of its
    manifest with an unreadable and a missing image added; ref: a folder of colour ramps and
    blocky noise, and the same images as a Parquet table of PNG bytes."""
    root = tmp_path_factory.mktemp("metrics")
    rng = np.random.default_rng(0)
    out, ref = root / "out", root / "ref"
    (out / "images").mkdir(parents=True)
    ref.mkdir()
    for i in range(N_GEN):
        Image.fromarray(_image(rng, "noise" if i % 3 else "ramp")).save(out / "images" / f"{i:04d}.png")
    for i in range(N_REF):
        a = _image(rng, "ramp") if i % 2 else np.kron(_image(rng, "noise")[:8, :8], np.ones((4, 4, 1), np.uint8))
        Image.fromarray(a).save(ref / f"r{i:03d}.png")
    uris = sorted(str(p) for p in (out / "images").glob("*.png"))
    (out / "manifest").mkdir()
    pq.write_table(pa.table({"id": [f"{i:04d}" for i in range(N_GEN)], "image": uris}),
                   out / "manifest" / "part-0.parquet")
    # The same images plus two that cannot be read, sorting between the good ones.
    bad = root / "out_bad"
    (bad / "manifest").mkdir(parents=True)
    (bad / "broken").mkdir()
    corrupt = bad / "broken" / "0005-corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    images = uris + [str(corrupt), str(out / "images" / "0009-missing.png")]
    pq.write_table(pa.table({"id": [str(i) for i in range(len(images))], "image": images}),
                   bad / "manifest" / "part-0.parquet")
    table = root / "ref.parquet"
    pq.write_table(pa.table({"image": [p.read_bytes() for p in sorted(ref.glob("*.png"))]}), table)
    weights = inception.save_random_inception_weights(str(root / "inception-random.pth"))
    return dict(root=root, out=out, ref=ref, bad=bad, table=table, weights=weights)


@pytest.fixture(scope="module")
def reference(data):
    import torch_fidelity

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch_fidelity.calculate_metrics(
            input1=str(data["out"] / "images"), input2=str(data["ref"]), cuda=False, isc=True, fid=True,
            kid=True, feature_extractor_weights_path=data["weights"], batch_size=1, cache=False, verbose=False,
            **OPTS)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_local(s3_endpoint):
    """A private local Ray whose workers (and this process) reach the S3 test endpoint."""
    import ray

    with set_env(AWS_ENDPOINT_URL=s3_endpoint):
        if ray.is_initialized():  # another module's cluster: use it, leave it running
            yield
            return
        tmp = tempfile.mkdtemp(prefix="sdbm-", dir="/tmp")
        ray.init(address="local", num_cpus=2, _temp_dir=tmp, include_dashboard=False, logging_level="WARNING")
        try:
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def runs(data, ray_local):
    """The three Ray runs every comparison below reads (module-scoped: extraction is the cost).
    The reference statistics are made from a copy of the reference images on S3, and saved there."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("metrics")
    fs.put(str(data["ref"]) + "/", "metrics/ref/", recursive=True)
    root, w = data["root"], ["--inception-weights", data["weights"]]
    results = {}

    def run(name, argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
        results[name] = (rc, out.getvalue(), err.getvalue())

    run("save_ref", ["metrics", "s3://metrics/ref", "--save-stats", REF_NPZ, "--workers", "1"] + w + CLI_OPTS)
    run("one", ["metrics", str(data["out"]), "--reference", str(data["ref"]), "--workers", "1"] + w + CLI_OPTS)
    run("several", ["metrics", str(data["bad"]), "--reference", str(data["table"]), "--workers", "2",
                    "--shard-size", "3",
                    "--save-stats", str(root / "gen.npz")] + w + CLI_OPTS)
    return results


def test_one_actor_matches_torch_fidelity(runs, data, reference):
    rc, out, err = runs["one"]
    assert rc == 0, err
    report = json.loads(out)
    assert report == json.loads((data["out"] / "metrics.json").read_text())
    for key in KEYS:
        assert _rel(report[key], reference[key]) < 1e-6, (key, report[key], reference[key])
    assert reference["inception_score_mean"] > 1.5  # the random weights give a non-trivial IS
    assert report["images"] == {
        "generated": {"source": str(data["out"]), "listed": N_GEN, "used": N_GEN, "unreadable": 0},
        "reference": {"source": str(data["ref"]), "listed": N_REF, "used": N_REF, "unreadable": 0}}
    assert any("fewer than the 2048" in w for w in report["warnings"])
    assert f"warning: generated: {N_GEN} images, fewer than the 2048" in err
    s = report["settings"]
    assert (s["isc_splits"], s["kid_subsets"], s["rng_seed"], s["official_weights"]) == (3, 10, 2020, False)


def test_several_actors_match_torch_fidelity_despite_unreadable_images(runs, data, reference):
    rc, out, err = runs["several"]
    assert rc == 0, err
    report = json.loads(out)
    for key in KEYS:
        assert _rel(report[key], reference[key]) < 1e-6, (key, report[key], reference[key])
    gen = report["images"]["generated"]
    assert (gen["listed"], gen["used"], gen["unreadable"]) == (N_GEN + 2, N_GEN, 2)
    assert report["images"]["reference"]["used"] == N_REF
    named = {e["image"]: e["error"] for e in report["unreadable"]}
    assert set(named) == {str(data["bad"] / "broken" / "0005-corrupt.png"),
                          str(data["out"] / "images" / "0009-missing.png")}
    assert "FileNotFoundError" in named[str(data["out"] / "images" / "0009-missing.png")]
    assert f"2 of {N_GEN + 2} images could not be read" in err
    assert json.loads((data["bad"] / "metrics.json").read_text()) == report


def test_saved_statistics_give_torch_fidelity_fid(runs, data, reference, capsys):
    assert runs["save_ref"][0] == 0, runs["save_ref"][2]
    assert f"saved FID statistics of {N_REF} images" in runs["save_ref"][2]
    import s3fs

    assert s3fs.S3FileSystem().ls("metrics/ref") == [f"metrics/ref/r{i:03d}.png" for i in range(N_REF)]
    ref = metrics.load_stats(REF_NPZ)
    assert ref["n"] == N_REF and ref["sigma"].shape == (2048, 2048)
    np.testing.assert_allclose(ref["sigma"], ref["sigma"].T, rtol=0, atol=1e-12)
    # Two statistics files: FID only, no Ray, nothing written unless --json says where.
    target = data["root"] / "two-npz.json"
    rc, out, err = _run(capsys, ["metrics", str(data["root"] / "gen.npz"), "--reference",
                                 REF_NPZ, "--json", str(target),
                                 "--inception-weights", data["weights"]])
    assert rc == 0, err
    report = json.loads(out)
    assert json.loads(target.read_text()) == report
    assert _rel(report["frechet_inception_distance"], reference["frechet_inception_distance"]) < 1e-6
    assert "inception_score_mean" not in report


def test_shard_statistics_merge_to_single_pass():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(301, 2048)) * rng.random(2048) + 3 * rng.random(2048)).astype(np.float32)
    single = metrics.FidStats()
    single.add(x)
    merged = metrics.FidStats()
    for a, b in ((0, 7), (7, 7), (7, 150), (150, 301)):  # includes an empty shard
        part = metrics.FidStats()
        part.add(x[a:b])
        merged.merge(part)
    assert merged.n == single.n == 301
    np.testing.assert_allclose(merged.sum, single.sum, rtol=0, atol=1e-12 * np.abs(single.sum).max())
    np.testing.assert_allclose(merged.outer, single.outer, rtol=0, atol=1e-12 * np.abs(single.outer).max())
    mu, sigma = merged.mu_sigma()
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_is_and_kid_from_chunks_and_memmaps_equal_torch_fidelity(tmp_path):
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(103, 1008)) * 3).astype(np.float32)
    split = metrics.split_of_rank(103, 10, 2020)
    order = rng.permutation(103)  # chunks arrive in any order
    chunks = [(logits[order[i:i + 17]], split[order[i:i + 17]]) for i in range(0, 103, 17)]
    ours = metrics.inception_score(iter(chunks), 10)
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True, rng_seed=2020)
    assert _rel(ours[0], theirs["inception_score_mean"]) < 1e-12
    assert _rel(ours[1], theirs["inception_score_std"]) < 1e-9
    # KID from memory-mapped features with unreadable rows left out.
    f1, f2 = (rng.normal(size=(n, 2048)).astype(np.float32) + shift for n, shift in ((60, 0.3), (45, 0)))
    stored = np.lib.format.open_memmap(tmp_path / "f1.npy", mode="w+", dtype=np.float32, shape=(64, 2048))
    keep = np.sort(rng.choice(64, 60, replace=False))
    stored[keep] = f1
    ours = metrics.kernel_inception_distance(metrics_job._Rows(stored, keep), f2, 7, 20, 2020)
    theirs = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=7,
                                    kid_subset_size=20, rng_seed=2020, verbose=False)
    assert ours == (theirs["kernel_inception_distance_mean"], theirs["kernel_inception_distance_std"])


def test_stats_file_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    mu, a = rng.normal(size=2048), rng.normal(size=(2048, 40))
    metrics.save_stats(str(tmp_path / "s.npz"), mu, a @ a.T, 40, "ab" * 32)
    back = metrics.load_stats(str(tmp_path / "s.npz"))
    assert np.array_equal(back["mu"], mu) and np.array_equal(back["sigma"], a @ a.T)
    assert (back["n"], back["inception_sha256"]) == (40, "ab" * 32)
    # The pytorch-fid / clean-fid format: just mu and sigma.
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu.astype(np.float32), sigma=a @ a.T)
    assert metrics.load_stats(str(tmp_path / "pytorch_fid.npz"))["n"] is None


def test_sources_list_images_in_torch_fidelity_order(data, tmp_path):
    folder = inception.open_source(str(data["ref"]))
    assert folder.kind == "folder" and folder.count == N_REF
    uris = [u for _, spec in folder.shards(3) for u in spec[1]]
    assert uris == folder.uris == sorted(str(p) for p in data["ref"].glob("*.png"))
    job = metrics_job.open_source(str(data["bad"]))
    assert job.kind == "job" and job.count == N_GEN + 2 and [s for s, _ in job.shards(5)] == [0, 5, 10]
    table = inception.open_source(str(data["table"]))
    assert table.kind == "table" and [s for s, _ in table.shards(4)] == [0, 4, 8]
    # Table rows read back as the very pixels of the folder's files.
    items = inception.shard_items(table.shards(4)[1][1])
    assert np.array_equal(inception.read_image(items[0][1]), np.asarray(Image.open(uris[4]).convert("RGB")))
    # {bytes, path} structs (Hugging Face datasets) and relative paths.
    (tmp_path / "imgs").mkdir()
    shutil.copy(uris[0], tmp_path / "imgs" / "a.png")
    pq.write_table(pa.table({"picture": [{"bytes": None, "path": "imgs/a.png"},
                                         {"bytes": (data["ref"] / "r001.png").read_bytes(), "path": None}]}),
                   tmp_path / "hf.parquet")
    src = inception.open_source(str(tmp_path / "hf.parquet"), image_column="picture")
    first, second = (inception.read_image(v) for _, v in inception.shard_items(src.shards(10)[0][1]))
    assert np.array_equal(first, np.asarray(Image.open(uris[0]).convert("RGB")))
    assert np.array_equal(second, np.asarray(Image.open(data["ref"] / "r001.png").convert("RGB")))


def _error(capsys, argv):
    rc, out, err = _run(capsys, ["metrics"] + argv)
    assert rc == 2 and "error: " in err, (rc, err)
    return err[err.index("error: "):]


def test_missing_weights_name_the_file_and_where_to_put_it(data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("SDBATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(inception.WEIGHTS_URL_ENV, "http://127.0.0.1:9/weights.pth")  # refuses connections
    err = _error(capsys, [str(data["ref"]), "--save-stats", str(tmp_path / "x.npz")])
    assert "weights-inception-2015-12-05-6726825d.pth" in err
    assert str(tmp_path / "cache" / "inception" / "weights-inception-2015-12-05-6726825d.pth") in err
    assert "--inception-weights" in err and inception.WEIGHTS_ENV in err
    assert not (tmp_path / "x.npz").exists()
    # A file in the cache is found without any flag.
    target = tmp_path / "cache" / "inception" / "weights-inception-2015-12-05-6726825d.pth"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(data["weights"], target)
    assert inception.resolve_inception_weights() == str(target)
    # ... and, named like the official file, it must carry the official hash.
    with pytest.raises(metrics.MetricsError, match="sha256"):
        inception.load_inception_weights(str(target))
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    assert f"${inception.WEIGHTS_ENV} {tmp_path / 'nope.pth'} does not exist" in _error(
        capsys, [str(data["ref"]), "--save-stats", str(tmp_path / "x.npz")])


class Payload:  # anything a weights_only load must refuse to construct
    pass


def test_weights_files_that_are_not_plain_inception_state_dicts(tmp_path):
    torch.save({"w": torch.zeros(1), "p": Payload()}, tmp_path / "pickled.pth")
    with pytest.raises(metrics.MetricsError, match="not a plain PyTorch state dict"):
        inception.load_inception_weights(str(tmp_path / "pickled.pth"))
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(metrics.MetricsError, match="not torch-fidelity's InceptionV3"):
        inception.build_inception(inception.load_inception_weights(str(tmp_path / "other.pth")).state_dict)


def test_bad_inputs_are_reported(data, tmp_path, capsys):
    w = ["--inception-weights", data["weights"]]
    assert "--reference REF" in _error(capsys, [str(data["out"])] + w)
    assert f"{tmp_path / 'nope'} does not exist" in _error(capsys, [str(data["out"]), "--reference",
                                                                    str(tmp_path / "nope")] + w)
    (tmp_path / "empty").mkdir()
    assert "holds no images" in _error(capsys, [str(data["out"]), "--reference", str(tmp_path / "empty")] + w)
    assert "no 'img' column" in _error(capsys, [str(data["out"]), "--reference", str(data["table"]),
                                                "--image-column", "img"] + w)
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(2048))
    assert "has no 'sigma' array" in _error(capsys, [str(data["out"]), "--reference",
                                                     str(tmp_path / "nosigma.npz")] + w)
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    assert "shape (64,)" in _error(capsys, [str(data["out"]), "--reference", str(tmp_path / "small.npz")] + w)
    assert "--metrics" in _error(capsys, [str(data["out"]), "--reference", str(data["ref"]), "--metrics", "fid,lpips"])


def test_run_with_metrics_uses_the_images_in_memory(data, runs, tmp_path):
    """`run --metrics`: the generation actors compute the features, nothing is read back, and
    the numbers equal those of reading the PNGs back (up to float32 rounding: the images go
    through Inception in generation batches)."""
    from sdbatch.model.weights import save_random_checkpoint

    model = save_random_checkpoint(tmp_path / "tiny.safetensors")
    pq.write_table(pa.table({"prompt": [f"a photo of thing {i}" for i in range(10)]}), tmp_path / "p.parquet")
    out, ref = tmp_path / "out", REF_NPZ
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()) as stdout, contextlib.redirect_stderr(err):
        rc = main(["run", str(tmp_path / "p.parquet"), "--model", str(model), "--output", str(out), "--width", "64",
                   "--height", "64", "--steps", "2", "--batch-size", "5", "--workers", "1", "--metrics",
                   "--reference", ref, "--inception-weights", data["weights"]])
    assert rc == 0, err.getvalue()
    assert "Inception features" not in err.getvalue()  # no feature actor ran: no image was read back
    report = json.loads(stdout.getvalue())
    assert report == json.loads((out / "metrics.json").read_text())
    assert report["images"]["generated"] == {"source": str(out), "listed": 10, "used": 10, "unreadable": 0}
    # A statistics file holds no features: KID is not given, and the report says why.
    assert "kernel_inception_distance_mean" not in report
    assert any("KID skipped" in w for w in report["warnings"])
    assert report["images"]["reference"] == {"source": ref, "statistics_of": N_REF}
    (out / "metrics.json").unlink()
    with contextlib.redirect_stdout(io.StringIO()) as stdout, contextlib.redirect_stderr(io.StringIO()):
        assert main(["metrics", str(out), "--reference", ref, "--inception-weights", data["weights"]]) == 0
    again = json.loads(stdout.getvalue())
    # (10 images in 10 IS splits: every split scores 1 and the IS std is rounding noise)
    for key in ("frechet_inception_distance", "inception_score_mean", "inception_score_std"):
        assert abs(report[key] - again[key]) <= 1e-4 * abs(again[key]) + 1e-12, (key, report[key], again[key])
