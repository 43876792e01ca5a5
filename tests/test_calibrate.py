"""Calibration: the choice of phi, the JSON round trip, and `minifd calibrate` on a tiny random model."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minifd import oracle
from minifd.calibrate import (choose_phi, collect_score_extremes, row_extremes, token_windows, unsafe_rows)
from minifd.cli import main
from minifd.errors import MinifdError
from minifd.kernels.softmax_range import (DEFAULT_SOFTMAX_RANGE, FILE_NAME, SoftmaxRange, load_softmax_ranges,
                                          save_softmax_ranges)
from minifd.model.config import LlamaConfig
from minifd.model.loader import Checkpoint
from tiny_model import tiny_model

LOW, HIGH = -60.0, 60.0


@st.composite
def row_ranges(draw):
    """-> (row_min, row_max) for 1..40 rows: a centre anywhere in +-500 and a spread of 0..150."""
    n = draw(st.integers(1, 40))
    centre = np.array(draw(st.lists(st.floats(-500, 500), min_size=n, max_size=n)))
    spread = np.array(draw(st.lists(st.floats(0, 150), min_size=n, max_size=n)))
    offset = np.array(draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)))
    return centre - spread * offset, centre + spread * (1 - offset)


def safe_count(row_min, row_max, phi):
    return int((~unsafe_rows(row_min, row_max, SoftmaxRange(phi, LOW, HIGH))).sum())


@given(row_ranges())
def test_phi_keeps_as_many_rows_safe_as_any_candidate(ranges):
    row_min, row_max = ranges
    phi = choose_phi(row_min, row_max, LOW, HIGH)
    # The best count is reached inside some row's interval, between two interval ends: try them all.
    ends = np.sort(np.concatenate([row_max - HIGH, row_min - LOW]))
    candidates = np.concatenate([(ends[:-1] + ends[1:]) / 2, ends, [0.0]])
    best = max(safe_count(row_min, row_max, c) for c in candidates)
    assert safe_count(row_min, row_max, phi) == best


def test_phi_centres_a_narrow_distribution():
    row_min, row_max = np.array([-30.0, -20.0]), np.array([10.0, 5.0])
    # Safe iff 10 - 60 < phi < -30 + 60: phi in (-50, 30); the middle is -10.
    assert choose_phi(row_min, row_max, LOW, HIGH) == pytest.approx(-10.0)


def test_row_extremes_ignore_masked_scores():
    scores = np.array([[[1.0, -np.inf], [3.0, -2.0]]])
    row_min, row_max = row_extremes(scores)
    assert row_min.tolist() == [1.0, -2.0] and row_max.tolist() == [1.0, 3.0]


def test_windows_cover_the_text_and_start_with_bos():
    ids = [9] + list(range(20))
    windows = token_windows(ids, 8, bos_id=9)
    assert all(w[0] == 9 and len(w) <= 8 for w in windows)
    assert sum((w[1:] for w in windows), []) == ids[1:]
    assert token_windows(list(range(10)), 4, bos_id=None) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_missing_file_gives_defaults_and_bad_files_fail(tmp_path):
    assert load_softmax_ranges(tmp_path, 3) == [DEFAULT_SOFTMAX_RANGE] * 3
    path = tmp_path / FILE_NAME
    save_softmax_ranges(path, [SoftmaxRange(1.5), SoftmaxRange(-2.0, -40.0, 30.0)])
    assert load_softmax_ranges(tmp_path, 2) == [SoftmaxRange(1.5), SoftmaxRange(-2.0, -40.0, 30.0)]
    assert load_softmax_ranges(path, 2) == load_softmax_ranges(tmp_path, 2)
    with pytest.raises(MinifdError, match="layers"):
        load_softmax_ranges(tmp_path, 3)
    path.write_text("{not json")
    with pytest.raises(MinifdError):
        load_softmax_ranges(tmp_path, 2)
    path.write_text(json.dumps({"format": "minifd-softmax-ranges/1", "layers": [{"phi": 0, "low": -90, "high": 10}]}))
    with pytest.raises(MinifdError):
        load_softmax_ranges(tmp_path, 1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory, _, _ = tiny_model(tmp_path_factory.mktemp("calibrate") / "m", seed=3)
    return directory


def test_calibrate_command_writes_ranges_the_engine_reads(model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    main(["calibrate", "--weights", str(model_dir), "--text", str(text), "--max-tokens", "200"])
    printed = capsys.readouterr().out
    config = LlamaConfig.from_dir(model_dir)
    ranges = load_softmax_ranges(model_dir, config.n_layers)
    document = json.loads((model_dir / FILE_NAME).read_text())
    assert "would recompute" in printed and len(ranges) == config.n_layers

    # The recorded shares are those of the oracle's own scores under the written ranges.
    ids = [256] + list(text.read_bytes())  # the byte tokenizer: BOS, then one token per byte
    extremes = collect_score_extremes(Checkpoint(model_dir), config, token_windows(ids, 200, 256), oracle.forward)
    for i, softmax_range in enumerate(ranges):
        row_min, row_max = extremes.layer(i)
        assert document["layers"][i]["rows"] == len(row_min)
        assert document["layers"][i]["recompute_share"] == pytest.approx(unsafe_rows(row_min, row_max, softmax_range).mean())
        assert unsafe_rows(row_min, row_max, softmax_range).sum() <= unsafe_rows(row_min, row_max, DEFAULT_SOFTMAX_RANGE).sum()


def test_calibrate_with_shifted_scores_moves_phi(model_dir, tmp_path):
    """A model whose scores all sit near +100 needs phi near 100: phi = 0 would recompute every row."""
    config = LlamaConfig.from_dir(model_dir)
    rng = np.random.default_rng(0)

    def shifted_forward(tensors, config, ids, on_scores):
        for layer in range(config.n_layers):
            seq = len(ids)
            scores = 100.0 + layer + rng.standard_normal((config.n_heads, seq, seq))
            on_scores(layer, np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf))

    extremes = collect_score_extremes(None, config, [list(range(50))], shifted_forward)
    for layer in range(config.n_layers):
        row_min, row_max = extremes.layer(layer)
        phi = choose_phi(row_min, row_max)
        assert abs(phi - (100.0 + layer)) < 10.0
        assert not unsafe_rows(row_min, row_max, SoftmaxRange(phi)).any()
        assert unsafe_rows(row_min, row_max, DEFAULT_SOFTMAX_RANGE).all()


def test_calibrate_default_text_and_user_errors(model_dir, tmp_path):
    out = tmp_path / "ranges.json"
    main(["calibrate", "--weights", str(model_dir), "--out", str(out), "--max-tokens", "128"])
    assert len(load_softmax_ranges(out, LlamaConfig.from_dir(model_dir).n_layers)) == 2
    for args in (["--weights", str(tmp_path / "nowhere")], ["--weights", str(model_dir), "--text", str(tmp_path / "none.txt")]):
        with pytest.raises(SystemExit) as stop:
            main(["calibrate", *args])
        assert stop.value.code == 2
