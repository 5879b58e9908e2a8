"""One option-validation helper for the T2R, top-k and transfer options: values are checked as given, never cast."""

from __future__ import annotations

from argparse import Namespace

import pytest

from t2r_fairseq.criterions.attention_transfer import TransferOptionError, validate_transfer_options
from t2r_fairseq.models.config import T2ROptionError, validate_t2r_options
from t2r_fairseq.models.option_checks import OptionError, check_choice, check_int, check_number
from t2r_fairseq.models.topk_config import TopkOptionError, topk_settings


def test_every_family_is_an_option_error() -> None:
    assert all(issubclass(e, OptionError) for e in (T2ROptionError, TopkOptionError, TransferOptionError))


@pytest.mark.parametrize("value", [2.5, "3", True, None])
def test_integers_are_not_cast(value) -> None:
    with pytest.raises(OptionError, match=r"--n must be an integer >= 1 \(things\), got "):
        check_int("--n", value, 1, "things")
    assert check_int("--n", 3, 1) == 3


@pytest.mark.parametrize("value", ["1e-3", float("nan"), float("inf"), False, -1.0, 0])
def test_numbers_are_finite_reals_in_range(value) -> None:
    with pytest.raises(OptionError, match=r"--x must be a finite number > 0 \(a scale\), got "):
        check_number("--x", value, "a scale", above=0)
    assert check_number("--x", 1, above=0) == 1.0


def test_ranges_name_both_ends() -> None:
    with pytest.raises(OptionError, match=r"--p must be in \[0, 1\), got 1"):
        check_number("--p", 1, at_least=0, below=1)
    with pytest.raises(OptionError, match=r"--p must be in \(0, 1\], got 0"):
        check_number("--p", 0, above=0, at_most=1)
    with pytest.raises(OptionError, match=r"--c must be one of a, b, got 'z'"):
        check_choice("--c", "z", ["a", "b"])


def test_topk_k_from_a_config_is_not_truncated() -> None:
    """A config (hydra, Python) can carry a float where argparse would have refused it: refused, not int()-ed."""
    with pytest.raises(TopkOptionError, match=r"--topk-k must be an integer >= 1 \(keys kept per query\), got 2.5"):
        topk_settings(Namespace(topk_k=2.5), language_model=True)
    with pytest.raises(TopkOptionError, match=r"--topk-ffn-k must be an integer >= 0 \(0: off\), got 1.5"):
        topk_settings(Namespace(topk_ffn_k=1.5, decoder_ffn_embed_dim=64), language_model=True)
    assert topk_settings(Namespace(topk_k=4), language_model=True).attention.k == 4


def test_t2r_and_transfer_options_use_the_same_checks() -> None:
    with pytest.raises(T2ROptionError, match=r"--linear-eps must be a finite number > 0 .*got '1e-6'"):
        validate_t2r_options(Namespace(linear_eps="1e-6"))
    with pytest.raises(TransferOptionError, match=r"--transfer-anneal-updates must be an integer >= 0, got 2.0"):
        validate_transfer_options(0.1, 0, "output_mse", 1.0, None, 2.0, 0, "checkpoint")
