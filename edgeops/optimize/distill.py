"""Knowledge distillation: train a torch student on a teacher's outputs over unlabeled data.

The teacher is any ONNX model (run by onnxruntime: its outputs over the data are computed
once). The student is a torch module: the pruned teacher, a narrower copy, or a user's
TorchScript file. Classifiers (a 2-D float output with more than one column) use KL
divergence on temperature-softened logits (Hinton et al.; loss x T^2), other models MSE.
Seeded, with early stopping on an eval set (the --eval data, else a fixed 10 % of --data
scored by agreement with the teacher; ties broken by the distillation loss there), patience
5, keeping the best epoch; the learning rate follows a cosine schedule over --epochs.
"""

from __future__ import annotations

import copy

import numpy as np

from ..errors import UsageError
from ..extras import require
from . import gates


def _is_classifier(o: np.ndarray) -> bool:
    return np.issubdtype(o.dtype, np.floating) and o.ndim == 2 and o.shape[1] > 1


def teacher_outputs(teacher, data: gates.Dataset, threads: int = 1) -> list[np.ndarray]:
    sess = gates.session(teacher, threads)
    outs = gates.collect_outputs(lambda f: sess.run(None, f), data)
    try:
        return [np.concatenate([b[k] for b in outs.batches]) for k in range(len(outs.batches[0]))]
    except ValueError:
        raise UsageError("the teacher's outputs are not one row per sample; distillation "
                         "needs that") from None


def distill_module(tm, student, *, student_label: str, work, data: gates.Dataset,
                   eval_set: gates.Dataset | None, prog, epochs: int = 10, lr: float = 1e-3,
                   temperature: float = 4.0, batch_size: int = 64, seed: int = 0,
                   patience: int = 5, threads: int = 1):
    """Train `student` in place on the outputs of the teacher (tm.onnx_path); export the
    best epoch to ONNX. Returns (report dict, path of the exported student)."""
    torch = require("torch", what="distillation")
    F = torch.nn.functional
    from .prune import check_signature, export_onnx, parity_problem, tensors

    if epochs < 1 or lr <= 0 or temperature <= 0 or batch_size < 1:
        raise UsageError("--epochs, --lr, --temperature and --batch-size must be positive")
    names = [s.name for s in tm.signature.inputs]
    prog.say(f"teacher outputs over {data.n} samples ({data.source})")
    teacher = tm.onnx_path
    t_out = teacher_outputs(teacher, data, threads)
    # the first classifier-like output carries the KL loss; without one, MSE on all outputs
    k = next((i for i, o in enumerate(t_out) if _is_classifier(o)), None)
    classifier = k is not None
    k = k or 0
    n = data.n
    train_x = data.feeds                       # samples on axis 0 (refused otherwise)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if eval_set is None:                       # hold out 10 % of the data, fixed
        n_hold = max(1, n // 10)
        hold, train_idx = order[:n_hold], order[n_hold:]
        ev_x = {nm: train_x[nm][hold] for nm in names}
        ev_ref, ev_labels, ev_what = t_out[k][hold], None, "agreement with the teacher on 10 % of --data"
    else:
        train_idx = order
        ev_x = eval_set.feeds
        ev_ref = teacher_outputs(teacher, eval_set, threads)[k]
        ev_labels = eval_set.labels
        ev_what = ("accuracy on " if ev_labels is not None else "agreement with the teacher on ") \
            + eval_set.source
    x_all = {nm: torch.from_numpy(np.ascontiguousarray(train_x[nm])) for nm in names}
    y_all = [torch.from_numpy(o) for o in t_out]

    T = float(temperature)

    def kd_loss(out, ref):
        if classifier:
            return F.kl_div(F.log_softmax(out / T, -1), F.softmax(ref / T, -1),
                            reduction="batchmean") * T * T
        return F.mse_loss(out, ref)

    def ev_score(model) -> tuple[float, float]:
        """(metric, distillation loss against the teacher) on the eval inputs: the loss
        breaks ties once a small eval set saturates the metric."""
        model.eval()
        with torch.no_grad():
            outs = []
            m = len(next(iter(ev_x.values())))
            for i in range(0, m, 256):
                args = [torch.from_numpy(np.ascontiguousarray(ev_x[nm][i:i + 256])) for nm in names]
                outs.append(tensors(model(*args))[k].numpy())
            out = np.concatenate(outs)
            loss = float(kd_loss(torch.from_numpy(out), torch.from_numpy(ev_ref)))
        if not classifier:
            a, b = out.reshape(len(out), -1), ev_ref.reshape(len(out), -1)
            return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12))), loss
        want = ev_labels.reshape(-1) if ev_labels is not None else ev_ref.argmax(1)
        return float(np.mean(out.argmax(1) == want)), loss

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise UsageError("the student has no trainable parameters")
    opt = torch.optim.Adam(params, lr)
    steps = epochs * -(-len(train_idx) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start, start_loss = ev_score(student)
    best, best_loss = start, start_loss
    best_state, best_epoch, history, stale = copy.deepcopy(student.state_dict()), 0, [], 0
    tidx = torch.from_numpy(train_idx)
    for epoch in range(1, epochs + 1):
        student.train()
        perm = tidx[torch.randperm(len(tidx), generator=g)]
        tick = prog.task(f"distilling epoch {epoch}/{epochs}", -(-len(perm) // batch_size))
        total, count = 0.0, 0
        try:
            for i in range(0, len(perm), batch_size):
                idx = perm[i:i + batch_size]
                out = tensors(student(*[x_all[nm][idx] for nm in names]))
                if classifier:
                    loss = kd_loss(out[k], y_all[k][idx])
                else:
                    loss = sum(F.mse_loss(o, y[idx]) for o, y in zip(out, y_all)
                               if o.dtype.is_floating_point)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                count += len(idx)
                tick()
        finally:
            prog.done()
        score, ev_loss = ev_score(student)
        history.append({"epoch": epoch, "loss": round(total / max(count, 1), 6),
                        "eval": round(score, 6), "eval_loss": round(ev_loss, 6)})
        prog.say(f"epoch {epoch}: loss {total / max(count, 1):.4f}, eval {score:.4f} "
                 f"(distillation loss {ev_loss:.4f})")
        if score > best or (score == best and ev_loss < best_loss):
            best, best_loss, best_epoch, stale = score, ev_loss, epoch, 0
            best_state = copy.deepcopy(student.state_dict())
        else:
            stale += 1
            if stale >= patience:
                break
    student.load_state_dict(best_state)
    student.eval()
    out_path = work / "student.onnx"
    export_onnx(tm, student, out_path)
    check_signature(tm.onnx_path, out_path, tm.feeds)
    problem = parity_problem(tm, student, out_path)
    if problem:
        from ..errors import VerificationError
        raise VerificationError(f"the exported student does not match the trained one: {problem}")
    report = {
        "student": student_label, "loss": "kl" if classifier else "mse",
        "temperature": T, "lr": lr, "epochs": epochs, "epochs_run": len(history),
        "best_epoch": best_epoch, "early_stopped": len(history) < epochs, "seed": seed,
        "batch_size": batch_size, "data": data.source, "samples": int(len(train_idx)),
        "eval": ev_what, "eval_before": start, "eval_after": best, "history": history,
        "teacher": {}, "student_before": {}, "student_after": {},
    }
    return report, out_path
