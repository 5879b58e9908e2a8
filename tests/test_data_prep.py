"""data-prep/: each dataset script end to end on the offline fixture (laid out like the upstream downloads and
served as a file:// mirror), re-runs and resumes, and the download failure modes (checksum mismatch, corrupt
archive without a published sum, unreachable mirror, resumed .part over HTTP Range and file://)."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fixtures.make_fixtures import make_fixtures

REPO = Path(__file__).resolve().parents[1]
PREP = REPO / "data-prep"
sys.path.insert(0, str(PREP))

import download  # noqa: E402
import moses_bpe  # noqa: E402
import prepare  # noqa: E402

UNREACHABLE = "http://127.0.0.1:9/"


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("fixture")
    return root, make_fixtures(root)


def _env(mirror: str, sums: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2R_DATA_")}
    env.update(T2R_DATA_MIRROR=mirror, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if sums is not None:
        env["T2R_DATA_CHECKSUMS"] = str(sums)
    return env


def run_script(name: str, out: Path, fixture: Path, *args: str, ok: bool = True, mirror: str | None = None,
               sums: Path | None | str = "default") -> subprocess.CompletedProcess:
    env = _env(mirror or fixture.as_uri(), fixture / "SHA256SUMS" if sums == "default" else sums)
    proc = subprocess.run(["bash", str(PREP / f"{name}.sh"), "--out", str(out), *args], capture_output=True,
                          text=True, env=env, timeout=300)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{name}.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def snapshot(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


# -- the four scripts on the fixture -----------------------------------------------------------------------------

def test_wikitext103(fx, tmp_path):
    fixture, info = fx
    out = tmp_path / "wiki"
    run_script("wikitext103", out, fixture)
    for split in ("train", "valid", "test"):
        got = lines(out / f"wiki.{split}.tokens")
        assert len(got) == info[f"wiki.{split}"]
    assert any(l.startswith(" = ") for l in lines(out / "wiki.valid.tokens"))
    assert (out / "DONE").exists()
    before = snapshot(out)
    again = run_script("wikitext103", out, fixture)
    assert "nothing to do" in again.stderr and snapshot(out) == before


@pytest.fixture(scope="module")
def ende(fx, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ende") / "out"
    run_script("wmt14_ende", out, fx[0], "--bpe-tokens", "200", "--workers", "2")
    return out


def _check_wmt14(out: Path, tgt: str, info: dict, pair: str, every: int) -> None:
    for f in ["code", "DONE", "ref/test.en", f"ref/test.{tgt}"] + [f"{s}.{l}" for s in ("train", "valid", "test") for l in ("en", tgt)]:
        assert (out / f).is_file(), f
    assert not (out / "tmp").exists()
    n = {s: len(lines(out / f"{s}.en")) for s in ("train", "valid", "test")}
    for s in n:
        assert len(lines(out / f"{s}.{tgt}")) == n[s], s
    # valid = every Nth line of the tokenised training data, then both cleaned: only the dirty pairs go.
    assert n["valid"] == info[f"{pair}.train_pairs"] // every
    assert n["train"] + n["valid"] == info[f"{pair}.train_pairs"] - info[f"{pair}.dirty"]
    assert n["test"] == info["eval_segments"]
    train = lines(out / "train.en")
    assert all(1 <= len(l.split()) <= 250 for l in train)
    assert "@-@" in " ".join(train)  # Moses -a split "well-known"
    test = lines(out / "test.en")
    assert "@@" in " ".join(test)  # unseen names are split by BPE
    assert "&apos;" in test[0].replace("@@ ", "")  # ’ -> ' then Moses escaping, as fairseq's test pipeline
    ref = lines(out / "ref/test.en")
    assert len(ref) == n["test"] and "\u2019" in ref[0] and "@@" not in " ".join(ref)  # raw references
    code = lines(out / "code")
    assert code[0].startswith("#version") and len(code) <= 201


def test_wmt14_ende(fx, ende):
    _check_wmt14(ende, "de", fx[1], "ende", 100)
    done = dict(l.split("\t") for l in lines(ende / "DONE"))
    assert done["test"] == "30"


def test_wmt14_ende_rerun_is_a_noop_and_other_options_are_refused(fx, ende):
    before = snapshot(ende)
    proc = run_script("wmt14_ende", ende, fx[0], "--bpe-tokens", "200")
    assert "nothing to do" in proc.stderr and snapshot(ende) == before
    proc = run_script("wmt14_ende", ende, fx[0], "--bpe-tokens", "300", ok=False)
    assert proc.returncode == 1 and "other options (bpe: 200 -> 300)" in proc.stderr


def test_wmt14_ende_killed_run_resumes_to_the_same_result(fx, ende, tmp_path):
    out = tmp_path / "ende"
    shutil.copytree(ende, out)
    (out / "DONE").unlink()  # as if killed before the end: train.* gone, a half-written temp file left
    for f in ("train.en", "train.de", "code"):
        (out / f).unlink()
    (out / "train.en.tmp").write_text("half")
    run_script("wmt14_ende", out, fx[0], "--bpe-tokens", "200")
    for f in ("train.en", "train.de", "valid.de", "test.de", "code"):
        assert (out / f).read_bytes() == (ende / f).read_bytes(), f
    assert (out / "DONE").exists() and not (out / "train.en.tmp").exists()


def test_wmt14_ende_with_given_bpe_codes(fx, ende, tmp_path):
    out = tmp_path / "codes"
    run_script("wmt14_ende", out, fx[0], "--bpe-codes", str(ende / "code"))
    for f in ("code", "train.en", "valid.de", "test.en"):
        assert (out / f).read_bytes() == (ende / f).read_bytes(), f
    proc = run_script("wmt14_ende", tmp_path / "nocodes", fx[0], "--bpe-codes", str(tmp_path / "nope"), ok=False)
    assert proc.returncode == 1 and "--bpe-codes" in proc.stderr and "does not exist" in proc.stderr


def test_wmt14_enfr(fx, tmp_path):
    out = tmp_path / "enfr"
    run_script("wmt14_enfr", out, fx[0], "--bpe-tokens", "200", "--workers", "2")
    _check_wmt14(out, "fr", fx[1], "enfr", 1333)


def test_wmt17_zhen(fx, tmp_path):
    fixture, info = fx
    out = tmp_path / "zhen"
    run_script("wmt17_zhen", out, fixture, "--spm-vocab", "200", "--workers", "1")
    for f in ["spm.model", "DONE", "ref/test.zh", "ref/test.en"] + [f"{s}.{l}" for s in ("train", "valid", "test") for l in ("zh", "en")]:
        assert (out / f).is_file(), f
    n = {s: len(lines(out / f"{s}.zh")) for s in ("train", "valid", "test")}
    assert n == {s: len(lines(out / f"{s}.en")) for s in n}
    assert n["train"] == info["zhen.train_pairs"] - info["zhen.dirty"]
    assert n["valid"] == n["test"] == info["eval_segments"]
    zh, en = lines(out / "train.zh"), lines(out / "train.en")
    assert "\u2581" in en[0] and any("\u4e00" <= c <= "\u9fff" for c in zh[0])  # sentencepiece pieces, Chinese
    ref = lines(out / "ref/test.zh")
    assert len(ref) == n["test"] and " " not in ref[0] and "\u2581" not in ref[0]  # raw, unsegmented Chinese
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    assert sp.decode(lines(out / "test.en")[1].split()) == lines(out / "ref/test.en")[1]


def test_wmt17_zhen_cwmt_needs_a_directory(fx, tmp_path):
    proc = run_script("wmt17_zhen", tmp_path / "z", fx[0], "--corpora", "nc,cwmt", ok=False)
    assert proc.returncode == 1 and "--cwmt-dir" in proc.stderr and "not downloaded automatically" in proc.stderr


# -- verification and download failures --------------------------------------------------------------------------

def _copy_fixture(fx, tmp_path: Path) -> Path:
    mirror = tmp_path / "mirror"
    shutil.copytree(fx[0], mirror)
    return mirror


def test_corrupt_archive_fails_its_checksum_and_leaves_nothing(fx, tmp_path):
    mirror = _copy_fixture(fx, tmp_path)
    data = bytearray((mirror / "test-full.tgz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (mirror / "test-full.tgz").write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = run_script("wmt14_ende", out, mirror, "--bpe-tokens", "200", ok=False, sums=mirror / "SHA256SUMS")
    assert proc.returncode == 1
    assert "checksum mismatch for test-full.tgz" in proc.stderr and "run again to re-download" in proc.stderr
    assert not (out / "raw" / "test-full.tgz").exists() and not (out / "raw" / "test-full.tgz.part").exists()
    assert not (out / "DONE").exists()


def test_corrupt_archive_without_published_sum_fails_structurally(fx, tmp_path):
    mirror = _copy_fixture(fx, tmp_path)
    sums = tmp_path / "sums"
    sums.write_text("".join(l + "\n" for l in lines(mirror / "SHA256SUMS") if "nc-v12" not in l))
    tgz = mirror / "training-parallel-nc-v12.tgz"
    tgz.write_bytes(tgz.read_bytes()[:-100])  # truncated: gzip's CRC/length trailer is gone
    out = tmp_path / "out"
    proc = run_script("wmt14_ende", out, mirror, "--bpe-tokens", "200", ok=False, sums=sums)
    assert proc.returncode == 1 and "training-parallel-nc-v12.tgz is corrupt or truncated" in proc.stderr
    assert not (out / "DONE").exists()
    assert not list((out / "raw" / "extracted").rglob("news-commentary-v12*"))


def test_unreachable_mirror_gives_the_offline_message(fx, tmp_path):
    out = tmp_path / "out"
    proc = run_script("wikitext103", out, fx[0], ok=False, mirror=UNREACHABLE)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("wikitext103: error: cannot download http://127.0.0.1:9/wikitext-103-v1.zip")
    assert "This machine may be offline" in err and str(out / "raw" / "wikitext-103-v1.zip") in err
    assert "T2R_DATA_MIRROR" in err
    assert not (out / "raw" / "wikitext-103-v1.zip").exists() and not (out / "DONE").exists()


def test_download_cli_prints_the_path_and_fails_cleanly(fx, tmp_path):
    env = _env(fx[0].as_uri(), fx[0] / "SHA256SUMS")
    cmd = [sys.executable, str(PREP / "download.py"), "--url", "http://statmt.org/wmt14/test-full.tgz", "--dest", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path / "test-full.tgz")
    proc = subprocess.run(cmd[:-1] + [str(tmp_path / "x")], capture_output=True, text=True,
                          env=_env(UNREACHABLE, None), timeout=60)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and err[-1].startswith("download.py: error: cannot download") and not proc.stdout


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files honouring 'Range: bytes=N-' (206), or ignoring it when ``honour_range`` is False."""
    honour_range = True
    ranges: list[str] = []

    def do_GET(self):  # noqa: N802
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        type(self).ranges.append(rng or "")
        start = int(rng.split("=")[1].split("-")[0]) if rng and self.honour_range else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("honour_range", [True, False])
def test_resumed_http_download_completes(fx, tmp_path, monkeypatch, honour_range):
    fixture = fx[0]
    handler = type("H", (_RangeHandler,), {"honour_range": honour_range, "ranges": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(fixture)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("T2R_DATA_MIRROR", f"http://127.0.0.1:{server.server_address[1]}/")
        monkeypatch.setenv("T2R_DATA_CHECKSUMS", str(fixture / "SHA256SUMS"))
        full = (fixture / "training-parallel-commoncrawl.tgz").read_bytes()
        dest = tmp_path / "dl"
        dest.mkdir()
        (dest / "training-parallel-commoncrawl.tgz.part").write_bytes(full[:5000])  # an interrupted download
        got = download.fetch("http://statmt.org/wmt13/training-parallel-commoncrawl.tgz", dest)
        assert got.read_bytes() == full and not (dest / "training-parallel-commoncrawl.tgz.part").exists()
        assert handler.ranges == ["bytes=5000-"]
        # Present and verified: not fetched again.
        download.fetch("http://statmt.org/wmt13/training-parallel-commoncrawl.tgz", dest)
        assert len(handler.ranges) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_resumed_file_download_and_checksum_table(fx, tmp_path, monkeypatch):
    fixture = fx[0]
    monkeypatch.setenv("T2R_DATA_MIRROR", str(fixture))  # a plain directory works as a mirror too
    monkeypatch.delenv("T2R_DATA_CHECKSUMS", raising=False)
    full = (fixture / "dev.tgz").read_bytes()
    (tmp_path / "dev.tgz.part").write_bytes(full[:100])
    import hashlib
    md5 = hashlib.md5(full).hexdigest()  # a 32-digit sum is an MD5 (sources like sacrebleu publish MD5 only)
    assert download.fetch("http://x/dev.tgz", tmp_path, md5).read_bytes() == full
    # The shipped table carries upstream's sum for dev.tgz, which the fixture does not match.
    assert download.known_sum("dev.tgz") == "9b1aa63c1cf49dccdd20b962fe313989"
    with pytest.raises(download.DownloadError, match="exists but does not match"):
        download.fetch("http://x/dev.tgz", tmp_path)
    bad = tmp_path / "bad.sums"
    bad.write_text("not-a-hash  dev.tgz\n")
    monkeypatch.setenv("T2R_DATA_CHECKSUMS", str(bad))
    with pytest.raises(download.DownloadError, match="bad.sums:1: expected"):
        download.known_sum("dev.tgz")


def test_shipped_table_only_has_well_formed_entries():
    sums = download.load_sums(download.SHIPPED_SUMS)
    assert sums["training-parallel-europarl-v7.tgz"].startswith("0224c7c7")
    assert sums["wikitext-103-v1.zip"] == "9ddaacaf6af0710eda8c456decff7832"
    assert "training-giga-fren.tar" not in sums and "training-parallel-un.tgz" not in sums  # none published


# -- pipeline pieces -------------------------------------------------------------------------------------------

def test_moses_steps_match_fairseqs_pipeline():
    moses_bpe._init_tok("en", "train")
    assert moses_bpe.tokenize_line("A well-known “test”\u200bcase, isn't it?\n") == \
        "A well @-@ known &quot; test &quot; case , isn &apos;t it ?"
    moses_bpe._init_tok("en", "test")
    assert moses_bpe.tokenize_line("It\u2019s") == "It &apos;s"
    keep = moses_bpe.keep_pair
    assert keep("a  b ", "c d", 1.5, 1, 250) == ("a b", "c d")
    assert keep("a b c d", "e", 1.5, 1, 250) is None and keep("", "e", 1.5, 1, 250) is None
    assert keep(" ".join("x" * 251), "y " * 200, 1.5, 1, 250) is None


def test_known_line_counts_are_enforced_for_upstream_data(monkeypatch):
    monkeypatch.delenv("T2R_DATA_CHECKSUMS", raising=False)
    prepare.check_known("newstest2014", 3003, "x")
    with pytest.raises(prepare.PrepError, match="published newstest2014 has 3003"):
        prepare.check_known("newstest2014", 30, "x")
    monkeypatch.setenv("T2R_DATA_CHECKSUMS", "/some/sums")  # custom data: its sums are the verification
    prepare.check_known("newstest2014", 30, "x")
