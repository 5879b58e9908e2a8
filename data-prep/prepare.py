#!/usr/bin/env python3
"""Download, verify and prepare the T2R corpora; called by the thin ``data-prep/<dataset>.sh`` wrappers.

    python data-prep/prepare.py {wikitext103,wmt14_ende,wmt14_enfr,wmt17_zhen} --out DIR [--raw DIR] [options]

Why one driver: the four datasets share the download/verify/extract/resume logic, and keeping it in Python
makes every step atomic (written under a temporary name, renamed when complete) and skippable when its output
exists, so a killed run resumes where it stopped and ``OUT/DONE`` (written last) marks a finished one. The
options of a run are recorded in ``OUT/.options``; re-running with different options into the same ``--out``
is refused rather than silently mixing outputs of two configurations.

See data-prep/README.md for what each dataset downloads, the pipeline and what is verified how.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import download  # noqa: E402
from moses_bpe import AtomicWriter, apply_bpe_file, clean_pair_files, learn_joint_bpe, open_text, tokenize_files  # noqa: E402

STATMT = "http://statmt.org"
URLS = {
    "europarl": f"{STATMT}/wmt13/training-parallel-europarl-v7.tgz",
    "commoncrawl": f"{STATMT}/wmt13/training-parallel-commoncrawl.tgz",
    "nc-v12": "http://data.statmt.org/wmt17/translation-task/training-parallel-nc-v12.tgz",
    "nc-v9": f"{STATMT}/wmt14/training-parallel-nc-v9.tgz",
    "un-fr": f"{STATMT}/wmt13/training-parallel-un.tgz",
    "giga-fren": f"{STATMT}/wmt10/training-giga-fren.tar",
    "test-full": f"{STATMT}/wmt14/test-full.tgz",
    "un-zh": "https://storage.googleapis.com/tfds-data/downloads/uncorpus/UNv1.0.en-zh.tar.gz",
    "wmt17-dev": "http://data.statmt.org/wmt17/translation-task/dev.tgz",
    "wmt17-test": "http://data.statmt.org/wmt17/translation-task/test.tgz",
    "wikitext103": "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
}
# Published sizes of the evaluation sets and WikiText-103 (checked when the data is upstream's, see README).
KNOWN_LINES = {
    "newstest2014": 3003, "newsdev2017-zhen": 2002, "newstest2017-zhen": 2001,
    "wiki.train.tokens": 1801350, "wiki.valid.tokens": 3760, "wiki.test.tokens": 4358,
}
UN_ZH_MANUAL = ("The UN Parallel Corpus v1.0 is also published at https://conferences.unite.un.org/uncorpus "
                "(manual download of UNv1.0.en-zh.tar.gz.00 and .01; join them with "
                "'cat UNv1.0.en-zh.tar.gz.0* > RAW/UNv1.0.en-zh.tar.gz'), or pass --corpora nc to train without it")


class PrepError(Exception):
    """A data-prep step failed; the message names the problem and the fix."""


def log(msg: str) -> None:
    print(f"[data-prep] {msg}", file=sys.stderr, flush=True)


def count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
    return n


def check_known(name: str, n: int, what: str) -> None:
    """Compare a line count with the published one, unless a custom sums table marks the data as non-upstream."""
    want = KNOWN_LINES.get(name)
    if want is None or os.environ.get("T2R_DATA_CHECKSUMS"):
        return
    if n != want:
        raise PrepError(f"{what} has {n} lines but the published {name} has {want}: the download is incomplete "
                        "or a different version; delete it from --raw and run again")


# -- downloads and archives -----------------------------------------------------------------------------------

def fetch(url: str, raw: Path, hint: str = "") -> Path:
    try:
        return download.fetch(url, raw)
    except download.DownloadError as e:
        raise PrepError(f"{e}{'. ' + hint if hint else ''}") from None


def extract(archive: Path, members: list[str], dest: Path) -> dict[str, Path]:
    """Extract ``members`` of a tar/tgz/zip into ``dest`` (atomically, skipping those present).

    Reading a tar archive goes through all of it, so gzip's CRC check covers the whole download: a truncated or
    corrupt archive fails here even when no published checksum exists.
    """
    out = {m: dest / m for m in members}
    todo = {m for m, p in out.items() if not p.exists()}
    if not todo:
        return out
    log(f"extracting {', '.join(sorted(todo))} from {archive.name}")

    staged: dict[str, Path] = {}  # renamed to their final names only once the whole archive has been read

    def save(name: str, fobj) -> None:
        target = out[name]
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        staged[name] = tmp
        with open(tmp, "wb") as f:
            shutil.copyfileobj(fobj, f, 1 << 20)
        todo.discard(name)

    def discard_staged() -> None:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)

    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                bad = z.testzip()
                if bad:
                    raise PrepError(f"{archive} is corrupt (member {bad} fails its CRC): delete it and run again")
                for name in sorted(todo):
                    if name in z.namelist():
                        with z.open(name) as f:
                            save(name, f)
        else:
            with tarfile.open(archive, mode="r|*") as tar:
                for info in tar:  # iterate to the end: decompresses (and CRC-checks) the whole archive
                    name = info.name[2:] if info.name.startswith("./") else info.name
                    if name in todo and info.isfile():
                        save(name, tar.extractfile(info))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        discard_staged()
        raise PrepError(f"{archive} is corrupt or truncated ({e}): delete it and run again") from None
    except PrepError:
        discard_staged()
        raise
    if todo:
        discard_staged()
        raise PrepError(f"{archive} lacks {', '.join(sorted(todo))}: it is not the expected upstream file "
                        "(or an incomplete copy); delete it and run again")
    for name, tmp in staged.items():
        os.replace(tmp, out[name])
    return out


SEG = re.compile(r"<seg[^>]*>\s*(.*?)\s*</seg>", re.IGNORECASE)


def sgm_segments(path: Path) -> list[str]:
    """The ``<seg>`` texts of a WMT SGML file, one per segment, untouched otherwise (raw reference text)."""
    with open(path, encoding="utf-8") as f:
        segs = [m.group(1) for line in f if "<seg" in line for m in [SEG.search(line)] if m]
    if not segs:
        raise PrepError(f"{path} has no <seg> lines: not a WMT SGML test set")
    return segs


def write_lines(path: Path, lines: list[str]) -> None:
    with AtomicWriter(path) as f:
        f.writelines(l + "\n" for l in lines)


def eval_set(sgms: tuple[Path, Path], name: str, dest: tuple[Path, Path]) -> int:
    """Extract a source/reference SGML pair to raw text; both sides must have the same (published) length."""
    if all(p.exists() for p in dest):
        return count_lines(dest[0])
    src, ref = (sgm_segments(p) for p in sgms)
    if len(src) != len(ref):
        raise PrepError(f"{sgms[0].name} has {len(src)} segments but {sgms[1].name} has {len(ref)}: "
                        "the test set is damaged; delete its archive from --raw and run again")
    check_known(name, len(src), f"{sgms[0].name}")
    for lines, p in zip((src, ref), dest):
        write_lines(p, lines)
    return len(src)


def pair_files(files: dict[str, Path], src: str, tgt: str, what: str) -> None:
    ns, nt = count_lines(files[src]), count_lines(files[tgt])
    if ns != nt:
        raise PrepError(f"{what}: {files[src].name} has {ns} lines but {files[tgt].name} has {nt}: the corpus is "
                        "not line-aligned (damaged download); delete its archive from --raw and run again")


# -- run bookkeeping -------------------------------------------------------------------------------------------

def start_run(out: Path, options: dict) -> bool:
    """Create OUT; False if a finished run with the same options exists (nothing to do)."""
    out.mkdir(parents=True, exist_ok=True)
    rec = out / ".options"
    if rec.exists():
        old = json.loads(rec.read_text())
        if old != options:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in options.items() if old.get(k) != v)
            raise PrepError(f"{out} holds a run with other options ({diff}); use another --out, or delete "
                            f"{out} to start over")
    else:
        rec.write_text(json.dumps(options, indent=1, sort_keys=True))
    if (out / "DONE").exists():
        log(f"{out} is complete (DONE exists); nothing to do")
        return False
    return True


def finish(out: Path, summary: dict) -> None:
    lines = [f"{k}\t{v}" for k, v in summary.items()]
    write_lines(out / "DONE", lines)
    log("done: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


# -- WikiText-103 -------------------------------------------------------------------------------------------------

def prep_wikitext103(a: argparse.Namespace) -> None:
    out = a.out
    if not start_run(out, {"dataset": "wikitext103"}):
        return
    z = fetch(URLS["wikitext103"], a.raw, "The same archive is also served at "
              "https://wikitext.smerity.com/wikitext-103-v1.zip (T2R_DATA_MIRROR=https://wikitext.smerity.com)")
    names = [f"wiki.{s}.tokens" for s in ("train", "valid", "test")]
    files = extract(z, [f"wikitext-103/{n}" for n in names], a.raw / "extracted")
    summary = {}
    for n in names:
        target = out / n
        if not target.exists():
            check_known(n, count_lines(files[f"wikitext-103/{n}"]), f"{z.name}:{n}")
            tmp = target.with_name(n + ".tmp")
            shutil.copyfile(files[f"wikitext-103/{n}"], tmp)
            os.replace(tmp, target)
        summary[n] = count_lines(target)
    finish(out, summary)


# -- WMT14 EN-DE / EN-FR (fairseq's Moses + joint BPE pipeline) -----------------------------------------------

def wmt14_spec(tgt: str, icml17: bool = False) -> dict:
    if tgt == "de":
        nc = ("nc-v9", "training/news-commentary-v9.de-en") if icml17 else ("nc-v12", "training/news-commentary-v12.de-en")
        return {"corpora": [("europarl", "training/europarl-v7.de-en"), ("commoncrawl", "commoncrawl.de-en"), nc],
                "test": "test-full/newstest2014-deen", "valid_every": 100}
    return {"corpora": [("europarl", "training/europarl-v7.fr-en"), ("commoncrawl", "commoncrawl.fr-en"),
                        ("un-fr", "un/undoc.2000.fr-en"), ("nc-v9", "training/news-commentary-v9.fr-en"),
                        ("giga-fren", "giga-fren.release2.fixed")],
            "test": "test-full/newstest2014-fren", "valid_every": 1333}


def split_every(inp: Path, every: int, train_out: Path, valid_out: Path) -> None:
    """fairseq's split: line numbers (1-based) divisible by ``every`` go to valid, the rest to train."""
    if train_out.exists() and valid_out.exists():
        return
    with open_text(inp) as f, AtomicWriter(train_out) as tr, AtomicWriter(valid_out) as va:
        for i, line in enumerate(f, 1):
            (va if i % every == 0 else tr).write(line)


def prep_wmt14(a: argparse.Namespace, src: str, tgt: str) -> None:
    out, raw, tmp = a.out, a.raw, a.out / "tmp"
    spec = wmt14_spec(tgt, getattr(a, "icml17", False))
    every = a.valid_every or spec["valid_every"]
    codes_in = a.bpe_codes.resolve() if a.bpe_codes else None
    if codes_in and not codes_in.is_file():
        raise PrepError(f"--bpe-codes {codes_in} does not exist: give the BPE code file of the checkpoint")
    options = {"dataset": f"wmt14_{src}{tgt}", "corpora": [c for c, _ in spec["corpora"]], "valid_every": every,
               "bpe": str(codes_in) if codes_in else a.bpe_tokens}
    if not start_run(out, options):
        return
    # 1. download and extract (verified: published sums or structure)
    train_parts: dict[str, list[Path]] = {src: [], tgt: []}
    for key, prefix in spec["corpora"]:
        archive = fetch(URLS[key], raw)
        gz = ".gz" if key == "giga-fren" else ""
        files = extract(archive, [f"{prefix}.{l}{gz}" for l in (src, tgt)], raw / "extracted")
        byl = {l: files[f"{prefix}.{l}{gz}"] for l in (src, tgt)}
        if not gz:
            pair_files(byl, src, tgt, f"{archive.name}:{prefix}")
        for l in (src, tgt):
            train_parts[l].append(byl[l])
    test_archive = fetch(URLS["test-full"], raw)
    p = spec["test"]
    sgms = extract(test_archive, [f"{p}-src.{src}.sgm", f"{p}-ref.{tgt}.sgm"], raw / "extracted")
    n_test = eval_set((sgms[f"{p}-src.{src}.sgm"], sgms[f"{p}-ref.{tgt}.sgm"]), "newstest2014",
                      (out / "ref" / f"test.{src}", out / "ref" / f"test.{tgt}"))
    # 2. Moses: normalise + remove non-printing + tokenise -a (train); ’->' + tokenise -a (test)
    for l in (src, tgt):
        tok = tmp / f"train.tags.tok.{l}"
        if not tok.exists():
            log(f"tokenizing training data ({l}, {a.workers} workers)")
            tokenize_files(train_parts[l], tok, l, "train", a.workers)
        if not (tmp / f"test.{l}").exists():
            tokenize_files([out / "ref" / f"test.{l}"], tmp / f"test.{l}", l, "test", 1)
    n_src, n_tgt = count_lines(tmp / f"train.tags.tok.{src}"), count_lines(tmp / f"train.tags.tok.{tgt}")
    if n_src != n_tgt:
        raise PrepError(f"tokenized training data has {n_src} {src} lines but {n_tgt} {tgt} lines (a giga-fren "
                        f"file is not line-aligned?); delete {tmp} and the damaged archive from --raw and run again")
    # 3. valid = every Nth line of the training data (fairseq's split)
    for l in (src, tgt):
        split_every(tmp / f"train.tags.tok.{l}", every, tmp / f"train.{l}", tmp / f"valid.{l}")
    # 4. joint BPE: learned on train of both sides, or a checkpoint's codes
    code = out / "code"
    if not code.exists():
        if codes_in:
            shutil.copyfile(codes_in, tmp / "code.tmp")
            os.replace(tmp / "code.tmp", code)
        else:
            log(f"learning joint BPE ({a.bpe_tokens} merges)")
            learn_joint_bpe([tmp / f"train.{src}", tmp / f"train.{tgt}"], code, a.bpe_tokens)
    for split in ("train", "valid", "test"):
        for l in (src, tgt):
            bpe_out = tmp / f"bpe.{split}.{l}"
            if not bpe_out.exists():
                log(f"applying BPE to {split}.{l}")
                apply_bpe_file(code, tmp / f"{split}.{l}", bpe_out, a.workers)
    # 5. clean train and valid (ratio 1.5, 1..250 tokens, on BPE tokens as fairseq); test untouched
    summary = {}
    for split in ("train", "valid"):
        if not ((out / f"{split}.{src}").exists() and (out / f"{split}.{tgt}").exists()):
            kept, total = clean_pair_files(tmp / f"bpe.{split}.{src}", tmp / f"bpe.{split}.{tgt}",
                                           out / f"{split}.{src}", out / f"{split}.{tgt}", 1.5, 1, 250)
            log(f"clean {split}: kept {kept} of {total} pairs")
        summary[split] = count_lines(out / f"{split}.{src}")
    for l in (src, tgt):
        if not (out / f"test.{l}").exists():
            shutil.copyfile(tmp / f"bpe.test.{l}", out / f"test.{l}.tmp")
            os.replace(out / f"test.{l}.tmp", out / f"test.{l}")
    summary["test"] = n_test
    if summary["valid"] == 0:
        raise PrepError(f"the valid split is empty (1 in {every} of {n_src} training lines, after cleaning): "
                        "use more training data or a smaller --valid-every")
    finish(out, summary)
    if not a.keep_tmp:  # after DONE: a run killed before it still has its intermediates to resume from
        shutil.rmtree(tmp, ignore_errors=True)


# -- WMT17 ZH-EN (sentencepiece) ----------------------------------------------------------------------------

def _normalise_line(line: str, nonprint) -> str:
    return " ".join(nonprint.sub(" ", line).split())


def cwmt_pairs(cwmt_dir: Path) -> list[tuple[Path, Path]]:
    """(zh, en) file pairs in an extracted CWMT directory: every ``*_en.txt`` with a ``*_ch|cn|zh.txt`` sibling."""
    pairs = []
    for en in sorted(cwmt_dir.rglob("*_en.txt")):
        stem = en.name[: -len("_en.txt")]
        zh = next((en.with_name(f"{stem}_{s}.txt") for s in ("ch", "cn", "zh") if en.with_name(f"{stem}_{s}.txt").exists()), None)
        if zh:
            pairs.append((zh, en))
    if not pairs:
        raise PrepError(f"--cwmt-dir {cwmt_dir} has no '<name>_en.txt' + '<name>_ch.txt' (or _cn/_zh) file pairs: "
                        "extract the CWMT parallel zips (casia2015, casict2011, casict2015, datum2015, datum2017, "
                        "neu2017) there")
    return pairs


def prep_wmt17_zhen(a: argparse.Namespace) -> None:
    import regex
    import sentencepiece as spm

    out, raw, tmp = a.out, a.raw, a.out / "tmp"
    corpora = [c for c in a.corpora.split(",") if c]
    unknown = set(corpora) - {"nc", "un", "cwmt"}
    if unknown or not corpora:
        raise PrepError(f"--corpora {a.corpora!r}: choose from nc, un, cwmt (comma-separated)")
    if "cwmt" in corpora and not a.cwmt_dir:
        raise PrepError("--corpora includes cwmt but no --cwmt-dir: the CWMT corpora are not downloaded "
                        "automatically (registration / FTP at http://nlp.nju.edu.cn/cwmt-wmt/); extract them "
                        "into a directory and pass --cwmt-dir DIR, or leave cwmt out of --corpora")
    options = {"dataset": "wmt17_zhen", "corpora": corpora, "spm_vocab": a.spm_vocab,
               "clean_ratio": a.clean_ratio, "cwmt_dir": str(a.cwmt_dir.resolve()) if a.cwmt_dir else None}
    if not start_run(out, options):
        return
    # 1. download and extract
    parts: list[tuple[Path, Path]] = []
    if "nc" in corpora:
        arc = fetch(URLS["nc-v12"], raw)
        f = extract(arc, [f"training/news-commentary-v12.zh-en.{l}" for l in ("zh", "en")], raw / "extracted")
        pair = {l: f[f"training/news-commentary-v12.zh-en.{l}"] for l in ("zh", "en")}
        pair_files(pair, "zh", "en", f"{arc.name}:news-commentary-v12.zh-en")
        parts.append((pair["zh"], pair["en"]))
    if "un" in corpora:
        arc = fetch(URLS["un-zh"], raw, UN_ZH_MANUAL.replace("RAW", str(raw)))
        f = extract(arc, [f"en-zh/UNv1.0.en-zh.{l}" for l in ("zh", "en")], raw / "extracted")
        pair = {l: f[f"en-zh/UNv1.0.en-zh.{l}"] for l in ("zh", "en")}
        pair_files(pair, "zh", "en", f"{arc.name}:UNv1.0.en-zh")
        parts.append((pair["zh"], pair["en"]))
    if "cwmt" in corpora:
        for zh, en in cwmt_pairs(a.cwmt_dir):
            pair_files({"zh": zh, "en": en}, "zh", "en", f"CWMT {zh.parent.name}")
            parts.append((zh, en))
    dev = fetch(URLS["wmt17-dev"], raw)
    test = fetch(URLS["wmt17-test"], raw)
    d = extract(dev, ["dev/newsdev2017-zhen-src.zh.sgm", "dev/newsdev2017-zhen-ref.en.sgm"], raw / "extracted")
    t = extract(test, ["test/newstest2017-zhen-src.zh.sgm", "test/newstest2017-zhen-ref.en.sgm"], raw / "extracted")
    n_valid = eval_set((d["dev/newsdev2017-zhen-src.zh.sgm"], d["dev/newsdev2017-zhen-ref.en.sgm"]),
                       "newsdev2017-zhen", (tmp / "valid.raw.zh", tmp / "valid.raw.en"))
    n_test = eval_set((t["test/newstest2017-zhen-src.zh.sgm"], t["test/newstest2017-zhen-ref.en.sgm"]),
                      "newstest2017-zhen", (out / "ref" / "test.zh", out / "ref" / "test.en"))
    # 2. training text: concatenated, control characters -> space, whitespace collapsed (no tokenisation:
    #    sentencepiece works on raw text and applies NFKC itself)
    nonprint = regex.compile(r"\p{C}")
    if not all((tmp / f"train.raw.{l}").exists() for l in ("zh", "en")):
        log(f"normalising training data ({len(parts)} corpora)")
        with AtomicWriter(tmp / "train.raw.zh") as wz, AtomicWriter(tmp / "train.raw.en") as we:
            for zh, en in parts:
                with open_text(zh) as fz, open_text(en) as fe:
                    for lz, le in zip(fz, fe):
                        wz.write(_normalise_line(lz, nonprint) + "\n")
                        we.write(_normalise_line(le, nonprint) + "\n")
    # 3. one joint sentencepiece model for both languages (shared vocabulary: --joined-dictionary)
    model = out / "spm.model"
    if not model.exists():
        log(f"training sentencepiece (joint zh+en, {a.spm_vocab} pieces)")
        prefix = tmp / "spm"
        spm.SentencePieceTrainer.train(
            input=f"{tmp / 'train.raw.zh'},{tmp / 'train.raw.en'}", model_prefix=str(prefix),
            vocab_size=a.spm_vocab, character_coverage=0.9995, model_type="unigram", hard_vocab_limit=False,
            input_sentence_size=a.spm_sample, shuffle_input_sentence=True, minloglevel=2,
            pad_id=-1, bos_id=-1, eos_id=-1, unk_id=0, num_threads=a.workers)
        shutil.copyfile(f"{prefix}.vocab", out / "spm.vocab")
        os.replace(f"{prefix}.model", model)
    sp = spm.SentencePieceProcessor(model_file=str(model))

    def pieces(batch: list[str]) -> list[list[str]]:
        try:
            return sp.encode(batch, out_type=str, num_threads=a.workers)
        except TypeError:  # sentencepiece without batch threading
            return sp.encode(batch, out_type=str)

    def encode(inp: Path, outp: Path) -> None:
        if outp.exists():
            return
        with open_text(inp) as f, AtomicWriter(outp) as w:
            batch: list[str] = []
            for line in f:
                batch.append(line.strip())
                if len(batch) == 10000:
                    w.writelines(" ".join(p) + "\n" for p in pieces(batch))
                    batch = []
            w.writelines(" ".join(p) + "\n" for p in pieces(batch))

    for l in ("zh", "en"):
        encode(tmp / f"train.raw.{l}", tmp / f"spm.train.{l}")
        encode(tmp / f"valid.raw.{l}", out / f"valid.{l}")
        encode(out / "ref" / f"test.{l}", out / f"test.{l}")
    # 4. clean train only (1..250 pieces, ratio --clean-ratio); the official dev/test sets stay complete
    if not ((out / "train.zh").exists() and (out / "train.en").exists()):
        kept, total = clean_pair_files(tmp / "spm.train.zh", tmp / "spm.train.en", out / "train.zh",
                                       out / "train.en", a.clean_ratio, 1, 250)
        log(f"clean train: kept {kept} of {total} pairs")
    summary = {"train": count_lines(out / "train.zh"), "valid": n_valid, "test": n_test}
    finish(out, summary)
    if not a.keep_tmp:  # after DONE: a run killed before it still has its intermediates to resume from
        shutil.rmtree(tmp, ignore_errors=True)


# -- command line ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="dataset", required=True)
    epilog = ("environment: T2R_DATA_MIRROR=DIR|URL fetches every file from there instead of upstream; "
              "T2R_DATA_CHECKSUMS=FILE replaces the published sums table (data-prep/checksums.sha256). "
              "Re-running skips finished steps; OUT/DONE marks a complete run. See data-prep/README.md.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True, help="output directory (DONE is written last)")
    common.add_argument("--raw", type=Path, default=None, help="download cache (default OUT/raw)")
    jobs = argparse.ArgumentParser(add_help=False)
    jobs.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel processes")
    jobs.add_argument("--keep-tmp", action="store_true", help="keep OUT/tmp (intermediate files)")
    sub.add_parser("wikitext103", parents=[common], prog="data-prep/wikitext103.sh", epilog=epilog, help="WikiText-103 in fairseq's LM layout",
                   description="WikiText-103 (wikitext-103-v1.zip) -> OUT/wiki.{train,valid,test}.tokens")
    for name, tgt in (("wmt14_ende", "de"), ("wmt14_enfr", "fr")):
        p = sub.add_parser(name, parents=[common, jobs], prog=f"data-prep/{name}.sh", epilog=epilog, help=f"WMT14 EN-{tgt.upper()}, Moses + joint BPE",
                           description=f"WMT14 EN-{tgt.upper()} as fairseq's prepare-wmt14en2{tgt}.sh: Moses "
                           f"normalise/tokenise -a, joint BPE, clean (ratio 1.5, 1..250). Writes "
                           f"OUT/{{train,valid,test}}.{{en,{tgt}}}, OUT/code, OUT/ref/test.{{en,{tgt}}}, OUT/DONE.")
        g = p.add_mutually_exclusive_group()
        g.add_argument("--bpe-tokens", type=int, default=40000, help="BPE merges to learn (default 40000)")
        g.add_argument("--bpe-codes", type=Path, default=None,
                       help="apply these BPE codes (e.g. a public checkpoint's) instead of learning them")
        p.add_argument("--valid-every", type=int, default=None,
                       help=f"valid = every Nth training line (default {100 if tgt == 'de' else 1333}, as fairseq)")
        if tgt == "de":
            p.add_argument("--icml17", action="store_true",
                           help="news-commentary v9 instead of v12 (fairseq's --icml17, the ConvS2S data)")
    p = sub.add_parser("wmt17_zhen", parents=[common, jobs], prog="data-prep/wmt17_zhen.sh", epilog=epilog, help="WMT17 ZH-EN, joint sentencepiece",
                       description="WMT17 ZH-EN: news-commentary v12 + UN v1.0 (+ CWMT from --cwmt-dir), "
                       "joint sentencepiece. Writes OUT/{train,valid,test}.{zh,en}, OUT/spm.model, "
                       "OUT/ref/test.{zh,en}, OUT/DONE.")
    p.add_argument("--spm-vocab", type=int, default=32000, help="sentencepiece vocabulary size (default 32000)")
    p.add_argument("--corpora", default="nc,un", help="training corpora among nc,un,cwmt (default nc,un)")
    p.add_argument("--cwmt-dir", type=Path, default=None, help="directory with the extracted CWMT corpora")
    p.add_argument("--clean-ratio", type=float, default=3.0, help="max piece-length ratio of a training pair")
    p.add_argument("--spm-sample", type=int, default=5_000_000,
                   help="sentences sampled to train sentencepiece (default 5M; memory grows with it)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    a.out = a.out.resolve()
    a.raw = (a.raw or a.out / "raw").resolve()
    for opt in ("bpe_tokens", "spm_vocab", "workers", "valid_every"):
        v = getattr(a, opt, None)
        if v is not None and v < 1:
            print(f"{a.dataset}: error: --{opt.replace('_', '-')} must be a positive integer, got {v}", file=sys.stderr)
            return 2
    try:
        if a.dataset == "wikitext103":
            prep_wikitext103(a)
        elif a.dataset == "wmt14_ende":
            prep_wmt14(a, "en", "de")
        elif a.dataset == "wmt14_enfr":
            prep_wmt14(a, "en", "fr")
        else:
            prep_wmt17_zhen(a)
    except PrepError as e:
        print(f"{a.dataset}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
