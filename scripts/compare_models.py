"""Compare a finished run's trained model with the original: `python scripts/compare_models.py
RUN_DIR [key=value ...]`, e.g. `eval.comparison.num_heldout=20 trainer.device=cpu`.

Reloads the run's `.hydra/config.yaml` (overrides applied), the base model through the same
`model` config, and the trained weights in `RUN_DIR/model` (LoRA adapters on that base, or a
full checkpoint); writes `RUN_DIR/comparison.json` and prints the table
(grpo.evaluation.comparison).
"""

import argparse
import sys
from contextlib import closing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from grpo.evaluation.comparison import compare_models  # noqa: E402
from grpo.model.loading import Policy  # noqa: E402
from grpo.run.build import (  # noqa: E402
    build_environment,
    build_evaluator,
    build_source,
    sampling_settings,
)
from grpo.run.servers import rollout_servers


def load_run_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The run's saved config with `key=value` overrides; clear errors for a wrong folder."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a grpo run folder?")
    if not (run_dir / "model").is_dir():
        raise FileNotFoundError(f"{run_dir / 'model'} not found: the run did not finish")
    cfg = OmegaConf.load(path)
    if "eval" not in cfg:
        raise KeyError(
            f"{path} has no `eval` section (a run older than grpo.evaluation.comparison)"
        )
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def load_trained(cfg: DictConfig, model_dir: Path, device: str) -> Policy:
    """The trained policy: saved LoRA adapters on the configured base, or the full checkpoint."""
    if cfg.model.lora.enabled:
        policy = instantiate(cfg.model, device=device)
        policy.model.load_adapter(str(model_dir), adapter_name="trained")
        policy.model.set_adapter("trained")
        return policy
    return instantiate(cfg.model, checkpoint=str(model_dir), device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder (outputs/DATE/TIME)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    cfg = load_run_config(args.run_dir, args.overrides)
    device = cfg.trainer.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg.seed)
    task = instantiate(cfg.task)
    reward_fn = instantiate(cfg.reward)
    policy = load_trained(cfg, args.run_dir / "model", device)
    sampling = sampling_settings(cfg, task)
    # Server mode: the run's servers (its config lists their addresses), or
    # rollout.vllm.servers=auto to start new ones for the comparison.
    with rollout_servers(cfg, args.run_dir / "compare"), closing(build_environment(cfg)) as env:
        source = build_source(cfg, task, policy, reward_fn, sampling, env)
        compare_models(cfg, build_evaluator(cfg, source, sampling), args.run_dir)


if __name__ == "__main__":
    main()
