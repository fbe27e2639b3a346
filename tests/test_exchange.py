"""The gradients' exchange (ddl/exchange.py): buckets overlapped with backward, bf16, PowerSGD."""
import numpy as np
import pytest

from conftest import run_mpi
from test_mpi import JOBS, job
from test_promises import small_run
from ddl import exchange, kernels


def bf16_round_trip(x, backend):
    """x rounded to bf16 by `backend`'s round_bf16 and widened back by its sum_bf16 (one rank)."""
    bits = np.empty(x.shape, np.uint16)
    backend.round_bf16(x, bits)
    back = np.empty(x.shape, np.float32)
    backend.sum_bf16(bits[None], back)
    return bits, back


@pytest.mark.parametrize("name", kernels.NAMES)
def test_bf16_rounds_to_nearest_even_within_half_an_ulp(name):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(100_003) * 10.0 ** rng.integers(-30, 30, 100_003)).astype(np.float32)
    bits, back = bf16_round_trip(x, kernels.get(name))
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0 ** -8)
    assert np.array_equal(bits, back.view(np.uint32) >> 16)        # widening is exact
    # Ties go to the even neighbour; NaN and inf survive; past bf16's largest value is inf.
    largest = np.float32(np.uint32(0x7F7F0000).view(np.float32))
    ties = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, np.nan, np.inf, -np.inf, -np.nan,
                     np.finfo(np.float32).max, largest, -np.finfo(np.float32).max], np.float32)
    _, got = bf16_round_trip(ties, kernels.get(name))
    assert got[0] == 1.0 and got[1] == 1 + 2 ** -6
    assert np.isnan(got[2]) and got[3] == np.inf and got[4] == -np.inf and np.isnan(got[5])
    assert got[6] == np.inf and got[7] == largest and got[8] == -np.inf


@pytest.mark.parametrize("name", kernels.NAMES)
def test_bf16_rounds_every_nan_payload_to_a_nan(name):
    """A NaN whose payload would carry into the exponent (the smallest: one mantissa bit, either
    sign; a signalling NaN) is bf16's quiet NaN, not inf; the values beside it stay themselves."""
    payloads = np.array([0x7F800001, 0xFF800001, 0x7F800000, 0x7FFFFFFF, 0x7F7FFFFF],
                        np.uint32).view(np.float32)
    bits, back = bf16_round_trip(payloads, kernels.get(name))
    assert bits.tolist() == [0x7FC0, 0x7FC0, 0x7F80, 0x7FC0, 0x7F80]
    assert np.isnan(back[[0, 1, 3]]).all() and back[2] == back[4] == np.inf


def test_the_compiled_bf16_passes_give_the_reference_s_bits():
    """Rounding, and sums of 1 to 5 ranks in rank order, on lengths around the compiled sum's
    block, with NaN, inf and subnormal values among them."""
    rng = np.random.default_rng(1)
    fast, slow = kernels.get("numba"), kernels.get("numpy")
    for n in (1, 1023, 1024, 1025, 3000):
        x = (rng.standard_normal((5, n)) * 10.0 ** rng.integers(-44, 38, (5, n))).astype(np.float32)
        x.flat[rng.integers(0, x.size, 3)] = [np.nan, np.inf, -np.inf]
        bits = [np.empty(x.shape, np.uint16) for _ in range(2)]
        for backend, out in zip((fast, slow), bits):
            for row, b in zip(x, out):
                backend.round_bf16(row, b)
        assert np.array_equal(bits[0], bits[1])
        for ranks in range(1, 6):
            sums = [np.empty(n, np.float32) for _ in range(2)]
            fast.sum_bf16(bits[0][:ranks], sums[0])
            slow.sum_bf16(bits[0][:ranks], sums[1])
            assert np.array_equal(sums[0].view(np.uint32), sums[1].view(np.uint32)), (n, ranks)


@pytest.mark.parametrize("spec, parsed", [("none", ("none", 4)), ("powersgd:2", ("powersgd", 2)),
                                          ("auto", ("auto", 4))])
def test_compress_values(spec, parsed):
    assert exchange.parse(spec) == parsed


@pytest.mark.parametrize("spec", ["fp8", "bf16:2", "powersgd:0", "powersgd:x"])
def test_bad_compress_values_are_refused(spec):
    with pytest.raises(ValueError, match="--compress"):
        exchange.parse(spec)


def load(folder, n):
    return [np.load(folder / f"rank{r}.npz") for r in range(n)]


@pytest.mark.parametrize("n, progress", [(2, "tests"), (4, "tests"), (2, "thread"),
                                         (4, "thread")])
def test_overlapped_buckets_equal_one_allreduce_bit_for_bit(n, progress, tmp_path):
    """Tested between layers (one host) or by the progress thread (across hosts), with the
    job's own all-reduce between backward and the exchange's end while the thread runs."""
    job(n, "exchange", tmp_path, "3", "none", progress)
    assert all(bool(r["exact"]) for r in load(tmp_path, n))


def test_powersgd_sends_updates_whose_sum_and_residuals_make_the_true_gradients(tmp_path):
    """Error feedback: over the steps, N times the applied means plus every rank's residual equal
    the sum of every rank's true gradients; and the exchange sends what rank 4 promises."""
    job(2, "exchange", tmp_path, "5", "powersgd")
    ranks = load(tmp_path, 2)
    true = sum(r["produced"] for r in ranks)
    sent = 2 * ranks[0]["applied"] + sum(r["error"] for r in ranks)
    np.testing.assert_allclose(sent, true, rtol=0, atol=1e-4 * np.abs(true).max())
    assert np.abs(ranks[0]["error"]).max() > 0.1           # it did compress
    assert int(ranks[0]["sent"]) < 0.05 * 4 * 225_034       # ref-cnn: 41 kB of 0.90 MB


def test_bf16_exchange_is_within_rounding_of_the_exact_mean(tmp_path):
    job(2, "exchange", tmp_path, "2", "bf16")
    ranks = load(tmp_path, 2)
    true = sum(r["produced"] for r in ranks) / 2
    np.testing.assert_allclose(ranks[0]["applied"], true, rtol=0, atol=2 ** -7 * np.abs(true).max())
    assert np.array_equal(ranks[0]["applied"], ranks[1]["applied"])


def test_the_watchdog_names_a_rank_that_hangs_inside_an_overlapped_backward(mnist_h5, tmp_path):
    done = run_mpi(2, [JOBS, "hang_in_backward", tmp_path,
                       *small_run(mnist_h5, "--epochs", "1", "--timeout", "1", "--model",
                                  "ref-cnn", "--compress", "none")])
    assert done.returncode == 5, done.stderr
    assert "Error: rank 1 did not reach the gradient all-reduce of step 2 within 1 s" in \
        done.stderr.splitlines(), done.stderr
