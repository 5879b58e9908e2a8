"""The README's option tables state each option's default (T2R, attention transfer, top-k); a user copies flags
from them, so they must say what the code does (the table once kept ``t2r`` as ``--feature-map``'s default after
the default had become ``t2r_qk``)."""

import dataclasses
import re
from pathlib import Path

from t2r_fairseq.criterions.attention_transfer import AttentionTransferConfig
from t2r_fairseq.models.config import T2RTranslationConfig
from t2r_fairseq.models.topk_config import TopkConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def _table_defaults() -> dict[str, str]:
    """``--option`` -> the default cell of every row of the README's option table."""
    rows = {}
    for line in README.read_text().splitlines():
        m = re.match(r"^\| `(--[a-z-]+)[^`]*` \| ([^|]+) \|", line)
        if m:
            rows[m.group(1)] = m.group(2).strip().strip("`")
    return rows


def _matches(cell: str, default: object) -> bool:
    """Whether a README default cell states the config's default."""
    value = cell.split(" (")[0]  # a cell may explain its value: "0 (off)"
    if default is None:
        return cell.startswith("--")  # it names the flag a None default falls back to
    if isinstance(default, bool):
        return value == ("on" if default else "off")
    if isinstance(default, (int, float)):
        try:
            return float(value) == float(default)
        except ValueError:
            return False
    return value == str(default)


def _check(config: type, required: set[str]) -> None:
    rows = _table_defaults()
    fields = {f"--{f.name.replace('_', '-')}": f.default for f in dataclasses.fields(config)}
    documented = {opt: cell for opt, cell in rows.items() if opt in fields}
    # the table documents every option a user sets (the others are fairseq's own)
    assert required <= set(documented), (sorted(required - set(documented)), sorted(rows))
    wrong = {opt: (cell, fields[opt]) for opt, cell in documented.items() if not _matches(cell, fields[opt])}
    assert not wrong, f"README default vs config default: {wrong}"


def test_readme_t2r_option_defaults_match_the_config() -> None:
    _check(T2RTranslationConfig, {"--feature-map", "--feature-size", "--cross-feature-size", "--feature-map-lr-scale",
                                  "--linear-kernel", "--linear-eps", "--trainable", "--sliding-window"})


def test_readme_criterion_option_defaults_match_the_config() -> None:
    _check(AttentionTransferConfig, {"--transfer-loss", "--transfer-weight", "--transfer-only-updates",
                                     "--distill-weight", "--transfer-teacher-projections"})


def test_readme_topk_option_defaults_match_the_config() -> None:
    _check(TopkConfig, {"--topk-k", "--topk-ffn-k", "--topk-attention"})
