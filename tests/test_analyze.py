"""fastlocal.analysis and `python -m fastlocal.analyze`: CKA against formulas typed in here, the linear
probe on synthetic features, and the CLI on tiny CPU runs."""

import itertools
import json
import math
import shutil
import sys

import pytest
import torch
from builders import TINY_RUN

import fastlocal.analysis.cka as cka_module
from fastlocal.analysis.cka import MinibatchCKA, gram_matrix, linear_cka, minibatch_cka, unbiased_hsic
from fastlocal.analysis.probe import linear_probe
from fastlocal.analyze import main as analyze_main
from fastlocal.train import main as train_main


def related_features(n=300, d_x=12, d_y=8, noise=1.0, seed=0):
    """x: (n, d_x) and y: (n, d_y) = a linear map of x plus noise (a CKA well inside (0, 1)), float64."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_x, generator=generator, dtype=torch.float64) + 2.0
    y = x @ torch.randn(d_x, d_y, generator=generator, dtype=torch.float64)
    return x, y + noise * torch.randn(n, d_y, generator=generator, dtype=torch.float64) * y.std()


def cka_by_centering_matrices(x, y):
    """Kornblith et al. (2019), eq. (3) and the HSIC estimator of eq. (2): linear kernels, H = I - 11'/n."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    gram_x, gram_y = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(gram_x, gram_y) / torch.sqrt(hsic(gram_x, gram_x) * hsic(gram_y, gram_y)))


def hsic_u_statistic(k, m):
    """Song et al. (2012): the U-statistic over ordered distinct quadruples (i, j, q, r) of
    k_ij m_ij + k_ij m_qr - 2 k_ij m_iq, divided by their number n!/(n-4)! (k, m: Gram matrices)."""
    n = len(k)
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i][j] * m[i][j] + k[i][j] * m[q][r] - 2 * k[i][j] * m[i][q]
    return total / (math.factorial(n) / math.factorial(n - 4))


def random_orthogonal(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_cka_with_itself_is_one():
    x, _ = related_features()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert minibatch_cka(x, x, batch_size=50) == pytest.approx(1.0, abs=1e-12)


def test_cka_matches_the_centering_matrix_formula():
    x, y = related_features(n=60)
    expected = cka_by_centering_matrices(x, y)
    assert 0.2 < expected < 0.95
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-10)
    assert linear_cka(x.float(), y.float()) == pytest.approx(expected, rel=1e-5)


def test_unbiased_hsic_matches_the_u_statistic():
    x, y = related_features(n=7)
    gram_x, gram_y = x @ x.T, y @ y.T
    expected = hsic_u_statistic(gram_x.tolist(), gram_y.tolist())
    assert float(unbiased_hsic(gram_x[None], gram_y[None])[0, 0]) == pytest.approx(expected, rel=1e-9)
    # gram_matrix centres the features per batch first; the U-statistic does not change
    assert float(unbiased_hsic(gram_matrix(x)[None], gram_matrix(y)[None])[0, 0]) == pytest.approx(expected, rel=1e-9)


def test_all_pairs_at_once_equal_each_pair_alone():
    x, y = related_features(n=40)
    grams_x = torch.stack([gram_matrix(x), gram_matrix(x[:, :5]), gram_matrix(y)])
    grams_y = torch.stack([gram_matrix(y), gram_matrix(x * 3)])
    pairs = unbiased_hsic(grams_x, grams_y)
    for p, q in itertools.product(range(3), range(2)):
        assert float(pairs[p, q]) == pytest.approx(float(unbiased_hsic(grams_x[p, None], grams_y[q, None])), rel=1e-12)


@pytest.mark.parametrize(
    "estimator", [linear_cka, lambda a, b: minibatch_cka(a, b, batch_size=64)], ids=["full", "minibatch"]
)
def test_invariances(estimator):
    x, y = related_features(n=256, d_x=12, d_y=12)
    base = estimator(x, y)
    assert estimator(x @ random_orthogonal(12, 1), y) == pytest.approx(base, rel=1e-9)
    assert estimator(x, y @ random_orthogonal(12, 2)) == pytest.approx(base, rel=1e-9)
    assert estimator(7.5 * x, 0.01 * y) == pytest.approx(base, rel=1e-9)
    # A general invertible map (here one that stretches a single direction) changes CKA.
    stretch = torch.eye(12, dtype=torch.float64)
    stretch[0, 0] = 30.0
    invertible = random_orthogonal(12, 3) @ stretch
    assert torch.linalg.matrix_rank(invertible) == 12
    assert abs(estimator(x @ invertible, y) - base) > 0.05


def test_minibatch_estimator_converges_to_the_full_value():
    x, y = related_features(n=2000, d_x=20, d_y=10, noise=2.0, seed=4)
    full_unbiased = MinibatchCKA(1, 1)
    full_unbiased.update(gram_matrix(x)[None], gram_matrix(y)[None])
    # One batch holding everything is the full-data unbiased CKA.
    assert minibatch_cka(x, y, batch_size=2000) == pytest.approx(float(full_unbiased.value()), rel=1e-12)
    target = float(full_unbiased.value())
    errors = [abs(minibatch_cka(x, y, batch_size=b) - target) for b in (25, 100, 500)]
    assert errors[-1] < 0.01 and max(errors) < 0.03, errors
    # ... and, with 2000 examples, the full-data (biased) CKA is close to the unbiased one.
    assert linear_cka(x, y) == pytest.approx(target, abs=0.02)


def test_minibatch_cka_memory_is_per_batch():
    accumulator = MinibatchCKA(2, 3)
    x, y = related_features(n=64)
    for start in range(0, 64, 16):
        batch = slice(start, start + 16)
        accumulator.update(torch.stack([gram_matrix(x[batch])] * 2), torch.stack([gram_matrix(y[batch])] * 3))
    assert accumulator.cross.shape == (2, 3) and accumulator.num_batches == 4
    with pytest.raises(ValueError, match="at least 4"):
        unbiased_hsic(gram_matrix(x[:3])[None], gram_matrix(y[:3])[None])


@pytest.mark.gpu
def test_cka_on_cuda_matches_cpu():
    x, y = related_features(n=512)
    assert minibatch_cka(x.float().cuda(), y.float().cuda(), 128) == pytest.approx(
        minibatch_cka(x.float(), y.float(), 128), abs=1e-5
    )


def separable_features(n, seed, num_classes=10, dim=24):
    """Gaussian clusters around 10 fixed, well separated centres; `seed` draws the noise only, so two seeds
    are a training and a test sample of one distribution."""
    centers = 6 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % num_classes
    return centers[labels] + torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), labels


def test_probe_separates_linearly_separable_features():
    train_x, train_y = separable_features(1000, seed=1)
    test_x, test_y = separable_features(1000, seed=2)
    result = linear_probe(train_x * 50 + 1000, train_y, test_x * 50 + 1000, test_y, 10)  # badly scaled
    assert result.train_acc >= 99 and result.test_acc >= 99


def test_probe_is_at_chance_on_shuffled_labels():
    train_x, train_y = separable_features(1000, seed=1)
    test_x, test_y = separable_features(2000, seed=2)
    generator = torch.Generator().manual_seed(3)
    shuffled_train = train_y[torch.randperm(len(train_y), generator=generator)]
    shuffled_test = test_y[torch.randperm(len(test_y), generator=generator)]
    result = linear_probe(train_x, shuffled_train, test_x, shuffled_test, 10)
    assert 5 <= result.test_acc <= 15  # chance is 10 %; 2000 test images give a std of 0.7 points


# -- the CLI on tiny runs ------------------------------------------------------------------------------------
TINY = [*TINY_RUN, "--train.epochs=1"]
ANALYSIS = ["--test-images", "40", "--train-images", "100", "--batch-size", "16", "--map-images", "2", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, method in [
        ("bp", ["--method.name=bp"]),
        ("dgl", ["--method.name=dgl", "--method.num_modules=4"]),
        ("mlaan", ["--method.name=mlaan", "--method.num_modules=3"]),
    ]:
        assert train_main([*TINY, *method, "--out", str(root / name)]) == 0
    return root


def test_cli_writes_json_and_figures(tiny_runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "analysis"
    code = analyze_main(
        [
            str(tiny_runs / "dgl"),
            str(tiny_runs / "mlaan"),
            "--reference",
            str(tiny_runs / "bp"),
            "--out",
            str(out),
            *ANALYSIS,
        ]
    )
    _, err = capsys.readouterr()
    assert code == 0, err
    document = json.loads((out / "analysis.json").read_text())
    assert document["parts"] == ["stem", "0.0", "0.1", "0.2", "1.0", "1.1", "1.2", "2.0", "2.1", "2.2"]
    assert document["settings"]["test_images"] == 40 and document["settings"]["train_images"] == 100
    runs = {run["label"]: run for run in document["runs"]}
    assert set(runs) == {"bp", "dgl", "mlaan"} and runs["bp"]["is_reference"]
    assert runs["dgl"]["module_outputs"] == [2, 5, 7, 9] and runs["bp"]["module_outputs"] == [9]
    for run in runs.values():
        assert len(run["linear_probe"]["test_acc"]) == 10
        assert all(0 <= a <= 100 for a in run["linear_probe"]["test_acc"])
    for name in ("dgl", "mlaan"):
        cka = runs[name]["cka_with_reference"]
        assert len(cka["matrix"]) == 10 and len(cka["matrix"][0]) == 10
        assert cka["diagonal"] == [cka["matrix"][p][p] for p in range(10)]
        assert cka["mean_diagonal"] == pytest.approx(sum(cka["diagonal"]) / 10)
        assert all(-0.2 < v <= 1 + 1e-6 for row in cka["matrix"] for v in row)
    assert "cka_with_reference" not in runs["bp"]
    assert set(document["figures"]) == {"linear_separability.png", "cka.png", "feature_maps.png"}
    for name in document["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 5000


def test_a_run_against_itself_has_cka_one(tiny_runs, tmp_path, monkeypatch):
    out = tmp_path / "self"
    shutil.copytree(tiny_runs / "dgl", tmp_path / "dgl_copy")
    gram_sizes = []
    original = cka_module.gram_matrix
    monkeypatch.setattr(cka_module, "gram_matrix", lambda f: gram_sizes.append(f.shape[0]) or original(f))
    assert (
        analyze_main([str(tmp_path / "dgl_copy"), "--reference", str(tiny_runs / "dgl"), "--out", str(out), *ANALYSIS])
        == 0
    )
    document = json.loads((out / "analysis.json").read_text())
    run = next(r for r in document["runs"] if r["label"] == "dgl_copy")
    assert run["cka_with_reference"]["diagonal"] == pytest.approx([1.0] * 10, abs=1e-6)
    # CKA memory: Gram matrices of one minibatch (--batch-size 16; 40 images = 16 + 16 + 8), never 40 x 40
    assert sorted(set(gram_sizes)) == [8, 16] and len(gram_sizes) == 3 * 10 * 2


def expect_error(args, capsys, *fragments):
    code = analyze_main([str(a) for a in args])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("fastlocal: error:") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_run_directory(tmp_path, capsys):
    expect_error([tmp_path / "nowhere", "--out", tmp_path / "a"], capsys, "nowhere", "does not exist")


def test_run_directory_without_checkpoint(tiny_runs, tmp_path, capsys):
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.toml").write_text((tiny_runs / "bp" / "config.toml").read_text())
    expect_error([run, "--out", tmp_path / "a"], capsys, "unfinished", "no checkpoint.pt")


def test_different_backbones(tiny_runs, tmp_path, capsys):
    other = tmp_path / "resnet32"
    assert (
        train_main([*TINY, "--model.arch=resnet32", "--data.max_train=25", "--method.name=bp", "--out", str(other)])
        == 0
    )
    expect_error(
        [tiny_runs / "dgl", "--reference", other, "--out", tmp_path / "a", *ANALYSIS],
        capsys,
        "resnet20",
        "resnet32",
        "same backbone",
    )


def test_out_is_a_file(tiny_runs, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    expect_error([tiny_runs / "bp", "--out", tmp_path / "file"], capsys, "is a file")


def test_bad_option_values(tiny_runs, tmp_path, capsys):
    expect_error([tiny_runs / "bp", "--out", tmp_path / "a", "--batch-size", "2"], capsys, "--batch-size")
    expect_error([tiny_runs / "bp", "--out", tmp_path / "a", "--test-images", "-1"], capsys, "--test-images")


def test_runs_on_different_test_images(tiny_runs, tmp_path, capsys):
    other = tmp_path / "fewer"
    assert train_main([*TINY, "--data.max_test=40", "--method.name=bp", "--out", str(other)]) == 0
    expect_error(
        [tiny_runs / "dgl", "--reference", other, "--out", tmp_path / "a", *ANALYSIS],
        capsys,
        "different test images",
        "data.max_test",
    )


def test_without_matplotlib_the_json_is_still_written(tiny_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "nofig"
    assert analyze_main([str(tiny_runs / "dgl"), "--out", str(out), *ANALYSIS]) == 0
    _, err = capsys.readouterr()
    assert "matplotlib is not installed" in err and "pip install 'fastlocal[analysis]'" in err
    document = json.loads((out / "analysis.json").read_text())
    assert document["figures"] == [] and not list(out.glob("*.png"))
    assert "cka_with_reference" not in document["runs"][0]  # no --reference, no CKA
