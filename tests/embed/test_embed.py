"""`curate embed` and curate.pool.io: correctness against plain open_clip, corrupt inputs, resume, ids, errors."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from curate.pool import io as pool_io  # noqa: E402
from curate.embed.stage import EmbedConfig, embed  # noqa: E402
from curate.core.errors import CurateError  # noqa: E402
from tests.pool_factory import make_pool  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARCH = "curate-tiny"


def _save_random_checkpoint(path: Path, seed: int) -> Path:
    from tests.run_factory import random_checkpoint

    return random_checkpoint(path, seed, ARCH)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=0)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, ckpt):
    """A 2-shard pool embedded once (shared by the read-only tests)."""
    fp = make_pool(tmp_path_factory.mktemp("p") / "pool", n_shards=2, per_shard=20, corrupt=1, failed=2)
    summary = embed(EmbedConfig(pool=fp.pool, model=ARCH, pretrained=str(ckpt), batch_size=7, progress=False))
    return fp, summary


def _files(fp, summary) -> list[Path]:
    return sorted(Path(summary["out_dir"]).glob("*.parquet"))


def _read(path: Path):
    return pq.read_table(path).to_pydict()


def test_rows_equal_successful_pool_rows_and_counts_reconcile(embedded):
    fp, s = embedded
    files = _files(fp, s)
    assert [f.name for f in files] == ["00000000.parquet", "00000001.parquet"]
    for shard, f in enumerate(files):
        assert _read(f)["uid"] == fp.success_uids(shard)  # same uids, same order, none dropped
    assert s["rows"] == len(fp.success_uids()) == 36
    assert s["embedded"] + s["errors"] == s["rows"]
    assert s["errors"] == len(fp.corrupt_uids) == 2
    schema = pq.read_schema(files[0])
    assert str(schema.field("image_emb").type) == "fixed_size_list<element: halffloat>[128]"
    assert str(schema.field("text_emb").type) == "fixed_size_list<element: halffloat>[128]"
    assert str(schema.field("clip_score").type) == "float"
    md = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert md["curate.model_id"] == s["model_id"] == Path(s["out_dir"]).name
    assert md["curate.arch"] == ARCH and md["curate.dims"] == "128" and md["curate.pretrained"].endswith("tiny.pt")


def test_embeddings_equal_plain_open_clip_forward(embedded, ckpt):
    import open_clip
    import torch
    from PIL import Image

    from curate.clip.models import register_configs

    fp, s = embedded
    register_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=str(ckpt))
    model.eval()
    tok = open_clip.get_tokenizer(ARCH)
    images, texts = fp.image_bytes(), fp.texts()
    got = {}
    for f in _files(fp, s):
        d = _read(f)
        for i, u in enumerate(d["uid"]):
            got[u] = (d["image_emb"][i], d["text_emb"][i], d["clip_score"][i])
    good = [u for u in fp.success_uids() if u not in fp.corrupt_uids]
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(io.BytesIO(images[u])).convert("RGB")) for u in good])
        ref_img = torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy()
        ref_txt = torch.nn.functional.normalize(model.encode_text(tok([texts[u] for u in good])), dim=-1).numpy()
    img = np.array([got[u][0] for u in good], dtype=np.float32)
    txt = np.array([got[u][1] for u in good], dtype=np.float32)
    score = np.array([got[u][2] for u in good], dtype=np.float32)
    assert np.abs(img - ref_img).max() < 1e-3
    assert np.abs(txt - ref_txt).max() < 1e-3
    assert np.abs(score - (ref_img * ref_txt).sum(1)).max() < 1e-3
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=2e-3)


def test_corrupt_image_gives_null_row_with_reason(embedded):
    fp, s = embedded
    rows = {}
    for f in _files(fp, s):
        d = _read(f)
        rows.update({u: {k: d[k][i] for k in d} for i, u in enumerate(d["uid"])})
    for u in fp.corrupt_uids:
        r = rows[u]
        assert r["image_emb"] is None and r["clip_score"] is None
        assert r["text_emb"] is not None  # the caption is still embedded
        assert "undecodable image" in r["error"]
    ok = [u for u in fp.success_uids() if u not in fp.corrupt_uids]
    assert all(rows[u]["error"] is None and rows[u]["image_emb"] is not None for u in ok)


def test_outputs_load_in_duckdb_joined_with_metadata(embedded):
    import duckdb

    fp, s = embedded
    q = f"""
        select m.status, count(e.uid) as n_emb, count(e.image_emb) as n_img, count(*) as n
        from '{fp.pool}/metadata/*.parquet' m left join '{s['out_dir']}/*.parquet' e using (uid)
        group by m.status order by m.status
    """
    t = duckdb.connect().sql(q).to_arrow_table().to_pylist()
    assert t == [
        {"status": "failed_to_download", "n_emb": 0, "n_img": 0, "n": 4},
        {"status": "success", "n_emb": 36, "n_img": 34, "n": 36},
    ]


def test_rerun_is_a_no_op_and_says_up_to_date(embedded, ckpt):
    from curate.cli import main

    fp, s = embedded
    before = {f: f.stat().st_mtime_ns for f in _files(fp, s)}
    r = CliRunner().invoke(main, ["embed", "--pool", str(fp.pool), "--model", ARCH, "--pretrained", str(ckpt)])
    assert r.exit_code == 0, r.output
    assert "already up to date" in r.output
    assert {f: f.stat().st_mtime_ns for f in _files(fp, s)} == before


def test_changed_shard_is_recomputed_alone(tmp_path, ckpt):
    fp = make_pool(tmp_path / "pool", n_shards=2, per_shard=8, corrupt=0, failed=1)
    cfg = EmbedConfig(pool=fp.pool, model=ARCH, pretrained=str(ckpt), progress=False)
    s = embed(cfg)
    # Re-download shard 1 with fewer rows: its embeddings are stale; shard 0's are not.
    make_pool(tmp_path / "other", n_shards=2, per_shard=6, corrupt=0, failed=1, seed=5)
    for sub in ("shards/00000001.tar", "metadata/00000001.parquet"):
        shutil.copy(tmp_path / "other" / sub, fp.pool / sub)
    s2 = embed(cfg)
    assert (s2["written"], s2["skipped"], s2["rows"]) == (1, 1, 5)
    assert len(_read(Path(s["out_dir"]) / "00000001.parquet")["uid"]) == 5


def test_model_id_changes_when_weights_change(tmp_path, ckpt):
    from curate.embed.stage import validate_model_args

    other = _save_random_checkpoint(tmp_path / "tiny2.pt", seed=1)
    a, b = validate_model_args(ARCH, str(ckpt)), validate_model_args(ARCH, str(other))
    assert a != b and a.startswith(ARCH + "__") and b.startswith(ARCH + "__")
    fp = make_pool(tmp_path / "pool", n_shards=1, per_shard=5, corrupt=0, failed=0)
    s1 = embed(EmbedConfig(pool=fp.pool, model=ARCH, pretrained=str(ckpt), progress=False))
    s2 = embed(EmbedConfig(pool=fp.pool, model=ARCH, pretrained=str(other), progress=False))
    assert s2["written"] == 1 and s1["out_dir"] != s2["out_dir"]  # new weights never reuse old embeddings
    e1 = np.array(_read(Path(s1["out_dir"]) / "00000000.parquet")["image_emb"], dtype=np.float32)
    e2 = np.array(_read(Path(s2["out_dir"]) / "00000000.parquet")["image_emb"], dtype=np.float32)
    assert not np.allclose(e1, e2, atol=1e-2)


def test_unknown_architecture_and_bad_checkpoints_are_clear_errors(tmp_path):
    from curate.cli import main

    fp = make_pool(tmp_path / "pool", n_shards=1, per_shard=3, corrupt=0, failed=0)
    run = CliRunner().invoke
    r = run(main, ["embed", "--pool", str(fp.pool), "--model", "ViT-Nope-99"])
    assert r.exit_code == 2 and "unknown model architecture 'ViT-Nope-99'" in r.output
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch checkpoint")
    r = run(main, ["embed", "--pool", str(fp.pool), "--model", ARCH, "--pretrained", str(garbage)])
    assert r.exit_code == 2 and str(garbage) in r.output and "Traceback" not in r.output
    r = run(main, ["embed", "--pool", str(fp.pool), "--model", ARCH, "--pretrained", str(tmp_path / "missing.pt")])
    assert r.exit_code == 2 and "missing.pt" in r.output and "not found" in r.output
    r = run(main, ["embed", "--pool", str(tmp_path / "nopool"), "--model", ARCH])
    assert r.exit_code == 2 and "not a pool directory" in r.output
    assert not (fp.pool / "embeddings" / f"{ARCH}__garbage").exists()


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import pyarrow.parquet as pq
    from curate.embed.stage import EmbedConfig, embed

    # Fault injection: the 3rd shard file dies half-written (SIGKILL while pyarrow is writing it).
    real_write, calls = pq.write_table, []
    def dying_write(table, where, **kw):
        calls.append(where)
        if len(calls) == 3:
            real_write(table.slice(0, 3), where, **kw)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(table, where, **kw)
    pq.write_table = dying_write
    embed(EmbedConfig(pool=sys.argv[1], model="curate-tiny", pretrained=sys.argv[2], batch_size=4,
                      loader_workers=int(sys.argv[3]), progress=False))
    """
)


@pytest.mark.reliability
def test_kill_and_resume_gives_identical_files(tmp_path, ckpt):
    fp = make_pool(tmp_path / "a", n_shards=5, per_shard=10, corrupt=1, failed=1)
    shutil.copytree(fp.pool, tmp_path / "b")
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(fp.pool), str(ckpt), "0"], env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == -9, p.stderr  # really killed
    out = next((fp.pool / "embeddings").iterdir())
    assert len(list(out.glob("0*.parquet"))) == 2 and list(out.glob(".tmp-*"))  # 2 done + a partial temp file
    # the same decode mode as the killed run: the default (1 loader process) gives the model one thread fewer,
    # and float sums in another thread count may differ in the last bit
    cfg = dict(model=ARCH, pretrained=str(ckpt), batch_size=4, progress=False, loader_workers=0)
    s = embed(EmbedConfig(pool=fp.pool, **cfg))
    assert (s["written"], s["skipped"]) == (3, 2)
    assert not list(out.glob(".tmp-*"))
    embed(EmbedConfig(pool=tmp_path / "b", **cfg))  # uninterrupted reference run
    ref = tmp_path / "b" / "embeddings" / out.name
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert [digest(f) for f in sorted(out.glob("*.parquet"))] == [digest(f) for f in sorted(ref.glob("*.parquet"))]


@pytest.mark.reliability
def test_external_sigkill_mid_run_then_resume(tmp_path, ckpt):
    """A kill at an arbitrary moment (here: as soon as the first shard file exists) loses no work."""
    import signal
    import time

    fp = make_pool(tmp_path / "a", n_shards=6, per_shard=12, corrupt=1, failed=1, image_size=160)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, "-m", "curate.cli", "embed", "--pool", str(fp.pool), "--model", ARCH,
           "--pretrained", str(ckpt), "--batch-size", "2", "--loader-workers", "1"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 900  # generous: only a safety net on a loaded machine
    while time.time() < deadline and p.poll() is None:
        if list((fp.pool / "embeddings").glob("*/0*.parquet")):
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    p.wait(timeout=120)
    done_at_kill = len(list((fp.pool / "embeddings").glob("*/0*.parquet")))
    assert 1 <= done_at_kill <= 6
    s = embed(EmbedConfig(pool=fp.pool, model=ARCH, pretrained=str(ckpt), batch_size=2, progress=False))
    assert s["written"] + s["skipped"] == 6 and s["skipped"] == done_at_kill
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in Path(s["out_dir"]).glob("*.parquet"))
    assert total == len(fp.success_uids())


def test_thread_process_and_inline_decode_write_identical_files(tmp_path, ckpt):
    fp = make_pool(tmp_path / "inline", n_shards=3, per_shard=9, corrupt=1, failed=1)
    cfg = dict(model=ARCH, pretrained=str(ckpt), batch_size=4, progress=False)
    shutil.copytree(fp.pool, tmp_path / "thread")
    shutil.copytree(fp.pool, tmp_path / "process")
    digests = {}
    for mode, n in (("inline", 0), ("thread", 3), ("process", 2)):
        s = embed(EmbedConfig(pool=tmp_path / mode, decode=mode, loader_workers=n, **cfg))
        assert (s["written"], s["rows"], s["errors"]) == (3, 24, 3)
        digests[mode] = [hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(s["out_dir"]).glob("*.parquet"))]
    assert digests["inline"] == digests["thread"] == digests["process"]


# How far the JPEG draft decode (the default) may move an image embedding from the full decode's, in 1 - cosine:
# perf/RESULTS.md "Embedding vs the pipeline limit" measures it on this pool's images and on real photographs.
DRAFT_TOL = 1e-2


def test_jpeg_draft_decode_stays_within_tolerance_of_full_decode(tmp_path, ckpt):
    from curate.clip.models import load_model
    from curate.embed.stage import draft_side

    # 256 px JPEGs for a 64 px model: the draft decodes them at 1/2 or 1/4 scale, so the two runs really differ
    fp = make_pool(tmp_path / "draft", n_shards=1, per_shard=12, corrupt=1, failed=1, image_size=256)
    shutil.copytree(fp.pool, tmp_path / "full")
    side = draft_side(load_model(ARCH, str(ckpt), "cpu").preprocess)
    assert side == 64
    good = [b for u, b in fp.image_bytes().items() if u not in fp.corrupt_uids]
    assert all(pool_io.decode_image(b, draft_size=side).size != pool_io.decode_image(b).size for b in good)
    out = {}
    for name, draft in (("draft", True), ("full", False)):
        s = embed(EmbedConfig(pool=tmp_path / name, model=ARCH, pretrained=str(ckpt), batch_size=5, jpeg_draft=draft,
                              decode="inline", progress=False))
        assert (s["rows"], s["errors"]) == (11, 1)
        f = Path(s["out_dir"]) / "00000000.parquet"
        md = {k.decode(): v.decode() for k, v in pq.read_schema(f).metadata.items()}
        assert md["curate.decode"] == ("jpeg-draft-64" if draft else "full")
        out[name] = _read(f)
    assert out["draft"]["uid"] == out["full"]["uid"] and out["draft"]["error"] == out["full"]["error"]
    assert out["draft"]["text_emb"] == out["full"]["text_emb"]
    ok = [i for i, e in enumerate(out["full"]["error"]) if e is None]
    a = np.array([out["draft"]["image_emb"][i] for i in ok], dtype=np.float32)
    b = np.array([out["full"]["image_emb"][i] for i in ok], dtype=np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert (1 - cos).max() < DRAFT_TOL
    assert not np.array_equal(a, b)  # the draft path ran: reduced decode does move the vectors a little


def test_draft_side_only_for_a_shortest_side_resize():
    from torchvision import transforms as T

    from curate.embed.stage import draft_side

    norm = T.Normalize((0.5,) * 3, (0.5,) * 3)
    assert draft_side(T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), norm])) == 224
    assert draft_side(T.Compose([T.Resize([96]), T.CenterCrop(96)])) == 96
    assert draft_side(T.Compose([T.Resize((64, 64)), T.ToTensor()])) is None  # exact (h, w): not handled, full decode
    assert draft_side(T.Compose([T.Resize(64, max_size=80)])) is None
    assert draft_side(T.Compose([T.CenterCrop(64), T.Resize(64)])) is None
    assert draft_side(lambda img: img) is None


def test_damaged_tar_and_missing_samples_are_recorded_not_fatal(tmp_path, ckpt):
    fp = make_pool(tmp_path / "pool", n_shards=2, per_shard=10, corrupt=0, failed=0)
    tar = fp.pool / "shards" / "00000000.tar"
    tar.write_bytes(tar.read_bytes()[: 9 * 512 + 100])  # truncated mid-member
    (fp.pool / "shards" / "00000001.tar").unlink()  # shard tar lost entirely
    s = embed(EmbedConfig(pool=fp.pool, model=ARCH, pretrained=str(ckpt), progress=False))
    assert s["rows"] == 20 and s["embedded"] + s["errors"] == 20 and s["errors"] >= 10
    d0 = _read(Path(s["out_dir"]) / "00000000.parquet")
    assert d0["uid"] == fp.success_uids(0)
    assert any(e and "damaged or truncated tar" in e for e in d0["error"])
    d1 = _read(Path(s["out_dir"]) / "00000001.parquet")
    assert all("shard tar 00000001.tar is missing" in e for e in d1["error"])


def _tar_with(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def test_pool_io_rejects_unsafe_member_names_and_never_extracts(tmp_path):
    tar = _tar_with(tmp_path / "x.tar", {
        "ok.jpg": b"img", "ok.txt": b"a cat", "ok.json": b'{"uid": "ab"}',
        "../evil.jpg": b"x", "/abs/path.jpg": b"y", "a/../../up.jpg": b"z",
    })
    samples = list(pool_io.iter_samples(tar))
    assert [s.key for s in samples][0] == "ok"
    assert samples[0].image == b"img" and samples[0].text == "a cat" and samples[0].uid == "ab" and not samples[0].error
    for s in samples[1:]:
        assert s.image is None and "unsafe tar member name" in s.error
    assert len(samples) == 4
    assert not (tmp_path.parent / "evil.jpg").exists() and not Path("/abs/path.jpg").exists()


def test_pool_io_truncated_tar_names_file_and_image_caps(tmp_path):
    fp = make_pool(tmp_path / "pool", n_shards=1, per_shard=6, corrupt=0, failed=0)
    tar = fp.pool / "shards" / "00000000.tar"
    tar.write_bytes(tar.read_bytes()[:2000])
    with pytest.raises(CurateError, match="00000000.tar: damaged or truncated tar"):
        list(pool_io.iter_samples(tar))
    errs: list[str] = []
    list(pool_io.iter_samples(tar, errors=errs))
    assert len(errs) == 1
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buf, format="PNG")
    with pytest.raises(pool_io.ImageDecodeError, match="over the cap"):
        pool_io.decode_image(buf.getvalue(), max_pixels=300 * 299)
    assert pool_io.decode_image(buf.getvalue()).size == (300, 300)
    assert [s.index for s in pool_io.list_shards(fp.pool)] == [0]
    assert pool_io.read_metadata(fp.pool, success_only=True).num_rows == 6
    (fp.pool / "metadata" / "00000000.parquet").write_bytes(b"junk")
    with pytest.raises(CurateError, match="00000000.parquet: cannot read pool metadata"):
        pool_io.read_metadata(fp.pool)


@pytest.mark.slow
def test_ray_actors_give_the_same_files_as_a_local_run(tmp_path, ckpt):
    pytest.importorskip("ray")
    fp = make_pool(tmp_path / "a", n_shards=2, per_shard=6, corrupt=1, failed=1)
    shutil.copytree(fp.pool, tmp_path / "b")
    cfg = dict(model=ARCH, pretrained=str(ckpt), batch_size=4, progress=False, loader_workers=0)
    s_local = embed(EmbedConfig(pool=fp.pool, **cfg))
    # one actor keeps the test affordable on 2 cores; ActorPool scheduling is the same for N actors
    s_ray = embed(EmbedConfig(pool=tmp_path / "b", ray_address="local", cpus_per_worker=1, **cfg))
    assert (s_ray["written"], s_ray["rows"], s_ray["errors"]) == (2, s_local["rows"], s_local["errors"])
    for a, b in zip(sorted(Path(s_local["out_dir"]).glob("*.parquet")), sorted(Path(s_ray["out_dir"]).glob("*.parquet"))):
        ta, tb = _read(a), _read(b)
        assert ta["uid"] == tb["uid"] and ta["error"] == tb["error"]
        # actors run with their own thread count, so floats may differ in the last bits only
        for col in ("image_emb", "text_emb"):
            ea = np.array([v or [0.0] * 128 for v in ta[col]], np.float32)
            eb = np.array([v or [0.0] * 128 for v in tb[col]], np.float32)
            assert np.abs(ea - eb).max() < 1e-3


def test_tar_order_does_not_matter_rows_follow_metadata(tmp_path, ckpt):
    """Samples are streamed; a tar written in another order (or with a stray sample) gives the same file."""
    fp = make_pool(tmp_path / "a", n_shards=1, per_shard=11, corrupt=1, failed=1)
    shutil.copytree(fp.pool, tmp_path / "b")
    tar_b = tmp_path / "b" / "shards" / "00000000.tar"
    samples = list(pool_io.iter_samples(tar_b))
    members = {}
    for s in reversed(samples):
        members[f"{s.key}.jpg"] = fp.image_bytes()[s.uid]
        members[f"{s.key}.json"] = ('{"uid": "%s"}' % s.uid).encode()
    members["stray.jpg"] = b"not in metadata"
    _tar_with(tar_b, members)
    cfg = dict(model=ARCH, pretrained=str(ckpt), batch_size=4, progress=False)
    sa = embed(EmbedConfig(pool=fp.pool, **cfg))
    sb = embed(EmbedConfig(pool=tmp_path / "b", **cfg))
    ta, tb = pq.read_table(Path(sa["out_dir"]) / "00000000.parquet"), pq.read_table(Path(sb["out_dir"]) / "00000000.parquet")
    assert ta.replace_schema_metadata(None).equals(tb.replace_schema_metadata(None))
    assert ta["uid"].to_pylist() == fp.success_uids(0)
