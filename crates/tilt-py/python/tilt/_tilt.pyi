"""Type stubs of tilt's compiled module (see the package docstring for the sources)."""

from os import PathLike
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

Floats = Union[npt.NDArray[np.float64], Sequence[float]]

def best_of_n(
    probs: Floats, rewards: Floats, n: int, worst: bool = False, pmf: bool = True
) -> Dict[str, Any]:
    """Exact best-of-n (worst-of-n) with ties (arXiv 2401.01879): ``pmf`` (NumPy), ``kl``,
    ``kl_bound`` = log n − (n−1)/n, ``kl_estimate``, ``win_rate``, ``expected_reward``;
    ``pmf=False`` leaves the pmf out (never computed)."""

def tilt(
    probs: Floats, rewards: Floats, *, beta: Optional[float] = None, kl: Optional[float] = None
) -> Dict[str, Any]:
    """The tilt p·e^(r/β)/Z at ``beta`` or at KL ``kl`` nats (arXiv 2404.01730 §2)."""

def soft_best_of_n(probs: Floats, rewards: Floats, n: int, lam: float) -> Dict[str, Any]:
    """Soft best-of-n: draw i of n with probability ∝ e^(r_i/λ) (arXiv 2505.03156)."""

def divergences(q: Floats, p: Floats, alpha: float = 2.0) -> Dict[str, Any]:
    """KL(q‖p), KL(p‖q), Rényi of order alpha, TV, χ², squared Hellinger (inf where infinite)."""

def bounds(probs: Floats, rewards: Floats, ns: Sequence[int]) -> Dict[str, Any]:
    """σ² and, per n, √(2σ²·KL) beside best-of-n's improvement (arXiv 2406.05883)."""

def memoryless(
    probs: Floats, rewards: Floats, lengths: Sequence[int], delta: float,
    grid: Optional[float] = None,
) -> Dict[str, Any]:
    """The memoryless model at per-token KL ``delta`` (arXiv 2404.01730)."""

def infalign(
    n: int, *, procedure: Literal["bon", "won"] = "bon",
    transform: Literal["identity", "exp", "neg-exp"] = "identity",
    t: Optional[float] = None, beta: Optional[float] = None, kl: Optional[float] = None,
    optimize_t: bool = False, t_max: float = 200.0,
) -> Dict[str, Any]:
    """InfAlign's calibrated tilt and its inference-time win rates (arXiv 2412.19792)."""

def calibrate(reference_rewards: Floats, rewards: Floats) -> npt.NDArray[np.float64]:
    """C(y) = P(r(Z) < r(y)) + ½·P(r(Z) = r(y)) under the reference rewards' law."""

class Engine:
    """A loaded policy with its rewards and prefix scorers."""

    def __init__(
        self, model: Optional[Union[str, PathLike]] = None,
        reward: Optional[Union[str, Dict[str, str]]] = None,
        scorers: Optional[Dict[str, Union[str, PathLike]]] = None,
        threads: int = 0, max_batch: int = 64,
    ) -> None: ...
    def generate(
        self, prompt: Optional[str] = None, *, messages: Optional[List[Dict[str, str]]] = None,
        raw: bool = False,
        strategy: Literal["sample", "bon", "won", "soft-bon", "rewind", "cd-token", "cd-block"] = "bon",
        n: Optional[int] = None, temperature: Optional[float] = None,
        top_k: Optional[int] = None, top_p: Optional[float] = None, lam: Optional[float] = None,
        threshold: Optional[float] = None, max_draws: Optional[int] = None,
        block_k: Optional[int] = None, block_m: Optional[int] = None,
        scorer: Union[str, Sequence[Tuple[str, float]], Sequence[Dict[str, Any]], None] = None,
        choices: int = 1, seed: int = 0,
        max_new_tokens: int = 64, stop: Optional[List[str]] = None,
        reward: Optional[str] = None, report_rewards: Optional[List[str]] = None,
    ) -> Dict[str, Any]:
        """One request; the engine's response (outputs with text, reward, KL in nats).

        ``scorer``: a scorer's name, or ``[(name, weight), ...]`` for cd-token/cd-block
        guided by the weighted sum of several prefix scorers (arXiv 2310.17022, multi-objective CD); each
        output then reports ``scorer_values``. ``report_rewards``: further configured
        rewards each output is scored with, reported in its ``rewards``."""
    def score(
        self, prompts: Sequence[str], responses: Sequence[str], reward: Optional[str] = None
    ) -> npt.NDArray[np.float64]: ...
    def log_probs(
        self, prompt: Optional[str] = None, response: Optional[str] = None, *,
        messages: Optional[List[Dict[str, str]]] = None, raw: bool = False,
    ) -> Dict[str, Any]: ...
    @property
    def rewards(self) -> List[str]: ...
    @property
    def threads(self) -> int: ...
