"""The SMAT CPU study's claim tests on synthetic per-episode rows (the verdict follows the numbers)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from studies.smat_cpu_claims import claim_a, claim_b, claim_c, domain_clustering, pooled, routing_usage


def _rows(label: str, shift: dict[str, float], n: int = 60, seed: int = 0) -> pd.DataFrame:
    """Episode rows of one run: two ID and two OOD sources, the same episodes for every label."""
    rng = np.random.default_rng(seed)  # same seed -> same episode difficulty for every label
    frames = []
    for source, domain in (("a", "id"), ("b", "id"), ("x", "ood"), ("y", "ood")):
        base = rng.uniform(0.4, 0.8, n)
        noise = 0.01 * (-1.0) ** np.arange(n) * (len(label) % 2 * 2 - 1)  # mean exactly 0: no difference by chance
        frames.append(pd.DataFrame({"label": label, "learner": label, "source": source, "domain": domain,
                                    "episode_id": [f"{source}{i}" for i in range(n)], "mode": "zero_shot",
                                    "steps": 0, "accuracy": np.clip(base + shift[domain] + noise, 0, 1)}))
    return pd.concat(frames, ignore_index=True)


def test_pooled_pairs_the_same_episodes() -> None:
    frame = pd.concat([_rows("s", {"id": 0.05, "ood": 0.02}), _rows("p", {"id": 0.0, "ood": 0.0})])
    r = pooled(frame, "s", "p", "OOD")
    assert r["n"] == 120 and r["diff"] == pytest.approx(2.0, abs=0.5) and r["p_t"] < 1e-6
    assert pooled(frame, "s", "missing", "OOD") is None


@pytest.mark.parametrize("ood_shift,verdict", [(0.03, "yes"), (-0.03, "no (PMF is better)"),
                                               (0.0, "no (no significant difference)")])
def test_claim_a_verdict_follows_the_paired_test(ood_shift: float, verdict: str) -> None:
    frame = pd.concat([_rows("smat", {"id": 0.0, "ood": ood_shift}), _rows("pmf", {"id": 0.0, "ood": 0.0})])
    answer = claim_a(frame, "smat")
    assert answer.verdict == verdict and "n = 120" in answer.evidence


def test_claim_a_without_the_runs_is_not_measured() -> None:
    assert claim_a(_rows("pre", {"id": 0.0, "ood": 0.0}), "smat").verdict == "not measured"


def test_claim_b_needs_rising_id_and_an_interior_ood_peak() -> None:
    shifts = {0.5: (0.06, 0.00), 0.9: (0.03, 0.05), 0.99: (0.0, 0.01)}  # tau: (ID, OOD)
    frame = pd.concat([_rows(f"t{t}", {"id": i, "ood": o}) for t, (i, o) in shifts.items()])
    assert claim_b(frame, {t: f"t{t}" for t in shifts}).verdict == "yes"
    flat = pd.concat([_rows(f"t{t}", {"id": 0.0, "ood": 0.06 - t / 20}) for t in shifts])
    assert claim_b(flat, {t: f"t{t}" for t in shifts}).verdict == "no"


def test_claim_c_counts_wins_over_each_fixed_mask() -> None:
    frame = pd.concat([_rows("smat", {"id": 0.04, "ood": 0.04}), _rows("rand", {"id": 0.0, "ood": 0.0}),
                       _rows("mag", {"id": 0.04, "ood": 0.0})])
    answer = claim_c(frame, "smat", {"random": "rand", "magnitude": "mag"})
    assert answer.verdict == "partly" and len(answer.rows) == 4


def test_domain_clustering_separates_clustered_from_shuffled_scores() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for s, source in enumerate(("a", "b", "c")):
        centre = np.eye(4)[s] + 0.2
        for e in range(20):
            alpha = np.abs(centre + rng.normal(0, 0.05, 4))
            rows += [{"episode_id": f"{source}{e}", "source": source, "domain": "id", "expert": m,
                      "alpha": float(a)} for m, a in enumerate(alpha / alpha.sum())]
    clustered = pd.DataFrame(rows)
    result = domain_clustering(clustered, permutations=200)
    assert result["ratio"] < 0.5 and result["p"] < 0.01
    shuffled = clustered.assign(source=clustered.groupby("episode_id")["source"].transform(
        lambda s: rng.choice(["a", "b", "c"])))
    assert domain_clustering(shuffled, permutations=200)["p"] > 0.01


def test_routing_usage_tells_a_collapsed_router_from_a_spread_one() -> None:
    def frame(weights: dict[str, list[float]]) -> pd.DataFrame:
        return pd.DataFrame([{"episode_id": f"{s}{e}", "source": s, "expert": m, "alpha": a}
                             for s, w in weights.items() for e in range(3) for m, a in enumerate(w)])

    collapsed = routing_usage(frame({"a": [0.97, 0.01, 0.01, 0.01], "b": [0.95, 0.03, 0.01, 0.01]}))
    assert collapsed["collapsed_sources"] == 2 and collapsed["effective_experts"] < 1.3
    spread = routing_usage(frame({"a": [0.7, 0.1, 0.1, 0.1], "b": [0.1, 0.1, 0.7, 0.1]}))
    assert spread["collapsed_sources"] == 0 and spread["effective_experts"] > 3


def test_claim_d_reports_routing_across_the_sweep(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A collapsed main run answers 'weakly'; a sweep run whose router spreads and clusters is named as a 'yes'."""
    from studies import smat_cpu_claims

    rng = np.random.default_rng(0)

    def scores(spread: bool) -> pd.DataFrame:
        rows = []
        for s, source in enumerate(("a", "b", "c")):
            centre = np.eye(4)[s] + 0.05 if spread else np.array([1.0, 0.01, 0.01, 0.01]) + np.eye(4)[s] * 0.02
            for e in range(15):
                alpha = np.abs(centre + rng.normal(0, 0.01, 4))
                rows += [{"episode_id": f"{source}{e}", "source": source, "domain": "id" if s == 0 else "ood",
                          "expert": m, "alpha": float(a)} for m, a in enumerate(alpha / alpha.sum())]
        return pd.DataFrame(rows)

    frames = {tmp_path / "main": scores(spread=False), tmp_path / "low": scores(spread=True)}
    monkeypatch.setattr(smat_cpu_claims, "load_probes", lambda run_dir, name: frames[run_dir])
    main_only = smat_cpu_claims.claim_d(tmp_path / "main")
    assert main_only.verdict == "weakly: the router is nearly collapsed"
    swept = smat_cpu_claims.claim_d(tmp_path / "main", {0.5: tmp_path / "low", 0.9: tmp_path / "main"})
    assert swept.verdict.endswith("yes at τ 0.5 (router spread)") and "τ 0.5: ratio" in swept.evidence


def test_spearman_is_exact_for_a_short_sweep() -> None:
    from studies.smat_cpu_claims import spearman

    rho, p = spearman([0.5, 0.8, 0.9, 0.95, 0.99], [5.0, 4.0, 3.0, 2.0, 1.0])
    assert rho == pytest.approx(-1.0) and p == pytest.approx(2 / 120)  # the two perfectly monotone orderings
    rho, p = spearman([1, 2, 3, 4], [1, 3, 2, 4])
    assert rho == pytest.approx(0.8) and 0 < p < 1


def test_recipe_rows_compare_each_recipe_to_the_main_run(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main run comes first without a difference; a finished variant gets its paired difference and routing;
    an unfinished one is left out."""
    from studies import smat_cpu_claims

    frame = pd.concat([_rows("main", {"id": 0.0, "ood": 0.0}), _rows("upstream", {"id": 0.03, "ood": 0.0})])
    scores = pd.DataFrame([{"episode_id": f"{s}{e}", "source": s, "domain": "id", "expert": m,
                            "alpha": 0.7 if m == i else 0.1} for i, s in enumerate("abcd") for e in range(5)
                           for m in range(4)])
    monkeypatch.setattr(smat_cpu_claims, "load_probes", lambda run_dir, name: scores)
    dirs = {"main": tmp_path / "main", "upstream": tmp_path / "upstream"}
    rows = smat_cpu_claims.recipe_rows(frame, dirs, "main", ["upstream", "paper"])
    assert [r["run"] for r in rows] == ["main", "upstream"]
    assert "ID vs main" not in rows[0] and rows[1]["ID vs main"]["diff"] == pytest.approx(3.0, abs=0.2)
    assert rows[1]["OOD vs main"]["p_t"] > 0.05 and rows[1]["ID mean"] > rows[0]["ID mean"]
    assert rows[1]["usage"]["collapsed_sources"] == 0 and rows[1]["clustering"]["ratio"] < 0.5
