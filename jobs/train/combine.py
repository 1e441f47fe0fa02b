"""Several fine-tuning runs from one warm-up made into one bundle: an output ensemble or a weight soup.

Both validate the combination on the driver, on the decoded validation posters, as it will be
bundled; the calibration is then fitted on those logits (an average of calibrated members would
not be calibrated itself).
"""

from __future__ import annotations

import torch

from posterfusion.jobs.train.config import WorkerArgs, network_config
from posterfusion.jobs.train.finish import calibrate, validation_summary
from posterfusion.jobs.train.loop import say, training_model, validate
from posterfusion.models.ensemble import EnsembleNet, ensemble_state, members_shared_stages


def soup(args: WorkerArgs, datasets: dict, warm_path: str, members: list[dict]) -> dict:
    """A greedy model soup (Wortsman et al., 2022) of the members.

    Members sorted by their validation macro AUC, the best is the soup; each next one is averaged
    in only if the averaged weights score higher on validation. Models fine-tuned from one
    starting point often average into one better than each, at one model's inference cost; on
    this project's posters the average landed between its two members (measured), so no recipe
    uses it.
    """
    members = sorted(members, key=lambda m: -m["best"]["val_macro_auc"])
    chosen, current = [members[0]], members[0]
    for member in members[1:]:
        candidate = average_states([m["state"] for m in [*chosen, member]])
        record, logits, labels, branches = validate_model(_loaded(training_model(args), candidate), args,
                                                          datasets["val"])
        say(f"[train] soup of seeds {[m['seed'] for m in [*chosen, member]]}: val macro AUC "
            f"{record['val_macro_auc']:.4f} (so far {current['best']['val_macro_auc']:.4f})")
        if record["val_macro_auc"] > current["best"]["val_macro_auc"]:
            chosen.append(member)
            current = {"state": candidate, "logits": logits, "labels": labels, "branches": branches,
                       "best": record | {"epoch": f"soup of {len(chosen)}", "phase": "soup"}}
    return current | {"history": members[0]["history"], "run_path": warm_path,
                      "members": {"combine": "soup", "chosen": [m["seed"] for m in chosen],
                                  "runs": [member_summary(m, args) for m in members]}}


def ensemble(args: WorkerArgs, datasets: dict, warm_path: str, members: list[dict]) -> dict:
    """All members in one bundle, their logits averaged (:class:`~posterfusion.models.ensemble.EnsembleNet`).

    The stages every member left frozen are found in their weights and run once.
    """
    states = [m["state"] for m in members]
    single = network_config(args.config, args.facts)
    network = single.model_copy(update={"members": len(members),
                                        "shared_stages": members_shared_stages(single, states)})
    model = _loaded(EnsembleNet(network, load_weights=False), ensemble_state(states))
    record, logits, labels, branches = validate_model(model.to(memory_format=torch.channels_last), args,
                                                      datasets["val"])
    alone = ", ".join(f"{m['best']['val_macro_auc']:.4f}" for m in members)
    say(f"[train] ensemble of seeds {[m['seed'] for m in members]} ({network.shared_stages} backbone stages "
        f"shared): val macro AUC {record['val_macro_auc']:.4f} (members alone {alone})")
    return {"state": model.state_dict(), "logits": logits, "labels": labels, "branches": branches, "network": network,
            "best": record | {"epoch": f"ensemble of {len(members)}", "phase": "ensemble"},
            "history": members[0]["history"], "run_path": warm_path,
            "members": {"combine": "ensemble", "chosen": [m["seed"] for m in members],
                        "runs": [member_summary(m, args) for m in members]}}


def average_states(states: list[dict]) -> dict:
    """The element-wise mean of state dicts of one architecture (integer buffers: the first's)."""
    return {k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}


def _loaded(model, state: dict):
    model.load_state_dict(state)
    return model


def validate_model(model, args: WorkerArgs, val_dataset):
    """``validate`` on the driver, on the decoded validation posters (a soup or an ensemble is in no worker)."""
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(args.facts.pos_weight))
    batches = val_dataset.iter_torch_batches(batch_size=args.config.optim.batch_size)
    return validate(model, loss_fn, args, torch.device("cpu"), "full", batches)


def member_summary(member: dict, args: WorkerArgs) -> dict:
    """A member alone, as it would have been bundled: best epoch, calibrated validation metrics."""
    _, calibrated = calibrate(member["logits"], member["labels"], args.facts)
    return {"seed": member["seed"], "best": member["best"], "history": member["history"],
            "run_path": member["run_path"], "validation": validation_summary(member["labels"], calibrated, args.facts)}
