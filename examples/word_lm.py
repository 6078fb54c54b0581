#!/usr/bin/env python
"""A word-level LSTM language model trained by its own loop, with faultlab added to it.

    python examples/word_lm.py                 # all demos (about 4 s on 2 CPU cores)
    python examples/word_lm.py faults          # (a) bit flips through faultlab.torch.Injector
    python examples/word_lm.py checkpoint      # (b) faultlab.torch.Checkpointer: save, resume
    python examples/word_lm.py protect         # (c) faultlab.torch.Protector: NaN rolled back

The training code is written the way PyTorch's word_language_model example writes it: a
word-level tokenizer and dictionary, the corpus batchified into columns, truncated
backpropagation through time over windows of BPTT words with the LSTM's hidden state carried
from one batch to the next (detached each batch, reset each epoch), dropout, gradient
clipping, SGD at learning rate 20 divided by 4 whenever the validation loss stops improving
(ReduceLROnPlateau), and the validation perplexity at the end of each epoch. The corpus is
examples/data/tiny_corpus/ (train.txt, valid.txt: a short original story, a few KB).

faultlab's lines are marked at the end of the line. In `train()`: `# [inject]`, 4 lines
with the import (pytorchfi needs 22 for one forward injection, docs/torch.md);
`# [checkpoint]`, 7 lines (one of them the changed `range`). `train_protected()` is the same
loop under faultlab.torch.Protector (c): its body becomes `step_fn(batch)` (re-indented),
the hidden state moves into a dict the protector restores; `# [protect]` marks 10 lines (6
added, 4 changed). A loop that only protects needs 10 with the import: its Protector call fits
one line without the `injector=` argument the fault demo adds.
`script_train(resume, checkpoint, steps)` is the loop in crash_lab's script form
(examples/test_word_lm_crash.py kills it with SIGKILL and checks the resume is bit-identical).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a source checkout

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import faultlab.torch as ft  # noqa: E402                                      # [inject]

DATA = Path(__file__).resolve().parent / "data" / "tiny_corpus"

# the run: small enough for seconds on two CPU cores
EMSIZE, NHID, DROPOUT = 32, 64, 0.2
LR, CLIP = 20.0, 0.25
BATCH, EVAL_BATCH, BPTT = 8, 4, 20
EPOCHS, SEED = 8, 1111


# --- data: a word-level tokenizer ---------------------------------------------------------

class Dictionary:
    def __init__(self):
        self.word2idx: dict[str, int] = {}
        self.idx2word: list[str] = []

    def add_word(self, word: str) -> int:
        if word not in self.word2idx:
            self.idx2word.append(word)
            self.word2idx[word] = len(self.idx2word) - 1
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.idx2word)


def words(line: str) -> list[str]:
    """Lower-cased words and punctuation marks as tokens, and <eos> at the end of a line."""
    out: list[str] = []
    for raw in line.lower().split():
        core = raw.strip(".,:;!?\"'()")
        lead = raw[:len(raw) - len(raw.lstrip(".,:;!?\"'()"))]
        trail = raw[len(raw.rstrip(".,:;!?\"'()")):]
        out += list(lead) + ([core] if core else []) + list(trail)
    return out + ["<eos>"]


class Corpus:
    def __init__(self, path: Path = DATA):
        self.dictionary = Dictionary()
        self.train = self.tokenize(path / "train.txt")
        self.valid = self.tokenize(path / "valid.txt")

    def tokenize(self, path: Path) -> torch.Tensor:
        ids = [self.dictionary.add_word(w)
               for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
               for w in words(line)]
        return torch.tensor(ids, dtype=torch.int64)


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    """(tokens,) -> (tokens // bsz, bsz): each column an independent stretch of text."""
    nbatch = data.size(0) // bsz
    return data[:nbatch * bsz].view(bsz, -1).t().contiguous()


def get_batch(source: torch.Tensor, i: int):
    seq_len = min(BPTT, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].reshape(-1)


# --- the model ----------------------------------------------------------------------------

class RNNModel(nn.Module):
    """Encoder, one-layer LSTM, decoder (PyTorch's word_language_model RNNModel, LSTM only)."""

    def __init__(self, ntoken: int, ninp: int = EMSIZE, nhid: int = NHID,
                 dropout: float = DROPOUT):
        super().__init__()
        self.ntoken, self.nhid = ntoken, nhid
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, 1)
        self.decoder = nn.Linear(nhid, ntoken)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, x, hidden):
        emb = self.drop(self.encoder(x))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.ntoken)
        return torch.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int):
        return (torch.zeros(1, bsz, self.nhid), torch.zeros(1, bsz, self.nhid))


def repackage_hidden(h):
    """Detach the hidden state from the graph of the previous batch (truncated BPTT)."""
    return tuple(v.detach() for v in h)


def evaluate(model: RNNModel, source: torch.Tensor) -> float:
    model.eval()
    total, hidden = 0.0, model.init_hidden(EVAL_BATCH)
    with torch.no_grad():
        for i in range(0, source.size(0) - 1, BPTT):
            x, y = get_batch(source, i)
            output, hidden = model(x, hidden)
            total += len(x) * nn.functional.nll_loss(output, y).item()
    model.train()
    return total / (len(source) - 1)


def build(seed: int = SEED):
    """Everything the loop trains, seeded."""
    torch.manual_seed(seed)
    corpus = Corpus()
    train_data, val_data = batchify(corpus.train, BATCH), batchify(corpus.valid, EVAL_BATCH)
    model = RNNModel(len(corpus.dictionary))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.25, patience=0)
    return corpus, train_data, val_data, model, optimizer, scheduler


def batches_per_epoch(train_data: torch.Tensor) -> int:
    return len(range(0, train_data.size(0) - 1, BPTT))


# --- the user's training loop, with faultlab's lines marked -------------------------------

def train(ckpt_path, faults=(), every=5, epochs=EPOCHS, stop_after=None, log=None):
    """Train; returns {"losses": per step, "val_ppl": per epoch, "model", "hidden", "start"}.

    ckpt_path: the checkpoint file (saved every `every` steps; resumed from when it exists).
    faults: armed on the injector (none: a clean run). stop_after: return after that many
    steps (a run cut short, to resume)."""
    _, train_data, val_data, model, optimizer, scheduler = build()
    nbatches = batches_per_epoch(train_data)
    hidden = model.init_hidden(BATCH)
    injector = ft.Injector(model, optimizer)                                   # [inject]
    injector.arm(list(faults))                                                 # [inject]
    ckpt = ft.Checkpointer(ckpt_path, every=every, model=model,                # [checkpoint]
                           optimizer=optimizer, scheduler=scheduler,           # [checkpoint]
                           extra={"hidden": hidden})                           # [checkpoint]
    start = ckpt.resume()                                                      # [checkpoint]
    losses, val_ppl = [], []
    model.train()
    for step in range(start, epochs * nbatches):                   # [checkpoint] (was: range(0, ...
        epoch, i = divmod(step, nbatches)
        if i == 0:
            hidden = model.init_hidden(BATCH)
        data, targets = get_batch(train_data, i * BPTT)
        hidden = repackage_hidden(hidden)
        with injector.step(step):                                              # [inject]
            model.zero_grad()
            output, hidden = model(data, hidden)
            loss = nn.functional.nll_loss(output, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
        losses.append(loss.item())
        ckpt.step(step + 1, extra={"hidden": hidden})                          # [checkpoint]
        if i == nbatches - 1:
            val_loss = evaluate(model, val_data)
            scheduler.step(val_loss)
            val_ppl.append(math.exp(val_loss))
            if log:
                log(f"| end of epoch {epoch + 1} | step {step + 1:3d} | lr "
                    f"{optimizer.param_groups[0]['lr']:5.2f} | train loss {loss.item():5.2f} | "
                    f"valid ppl {val_ppl[-1]:8.2f}")
        if stop_after is not None and step + 1 - start >= stop_after:
            break
    ckpt.close()                                                               # [checkpoint]
    return {"losses": losses, "val_ppl": val_ppl, "model": model, "hidden": hidden,
            "start": start}


# --- (c) the same loop under faultlab.torch.Protector -------------------------------------

def train_protected(faults=(), every=5, epochs=EPOCHS):
    """The loop of train() under faultlab.torch.Protector: a detector check every step, a
    checkpoint every `every` steps, rollback and replay on an alarm. The loop's body becomes
    step_fn(batch), all of it (the hidden-state reset at an epoch's start and the validation at
    its end included), because a replay re-runs exactly that; the hidden state lives in the
    dict `state`, which the protector restores with the model."""
    _, train_data, val_data, model, optimizer, scheduler = build()
    nbatches = batches_per_epoch(train_data)
    state = {"hidden": model.init_hidden(BATCH)}                           # [protect] (was: hidden)
    val_ppl = {}                                # epoch -> perplexity (a replay rewrites it)

    def step_fn(batch):                         # [protect] (the loop body, indented under it)
        epoch, i, data, targets = batch                                    # [protect]
        if i == 0:
            state["hidden"] = model.init_hidden(BATCH)                     # [protect] (was: hidden)
        model.zero_grad()
        output, state["hidden"] = model(data, repackage_hidden(state["hidden"]))  # [protect]
        loss = nn.functional.nll_loss(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        if i == nbatches - 1:
            val_loss = evaluate(model, val_data)
            scheduler.step(val_loss)
            val_ppl[epoch] = math.exp(val_loss)
        return loss                                                        # [protect]

    injector = ft.Injector(model, optimizer)                               # [inject]
    injector.arm(list(faults))                                             # [inject]
    prot = ft.Protector(model, optimizer, step_fn, every=every,            # [protect]
                        scheduler=scheduler, extra=state, injector=injector)  # [protect]
    model.train()
    for step in range(epochs * nbatches):
        epoch, i = divmod(step, nbatches)
        prot.step(step, (epoch, i, *get_batch(train_data, i * BPTT)))      # [protect] (the body)
    prot.close()                                                           # [protect]
    return {"losses": list(prot.report.losses), "val_ppl": list(val_ppl.values()),
            "model": model, "hidden": state["hidden"], "report": prot.report}


# --- the loop in crash_lab's script form (examples/test_word_lm_crash.py) -----------------

def script_train(resume, checkpoint, steps):
    """train() as `train(resume, checkpoint, steps) -> state`: build and seed everything,
    load resume.state when resuming, train from resume.step to `steps`, call checkpoint(k,
    state) after step k, return the final state. The state holds everything that decides later
    steps: model, optimizer, schedule, hidden state, and torch's generator (dropout)."""
    _, train_data, val_data, model, optimizer, scheduler = build()
    nbatches = batches_per_epoch(train_data)
    hidden = model.init_hidden(BATCH)
    start = 0
    if resume is not None:
        model.load_state_dict(resume.state["model"])
        optimizer.load_state_dict(resume.state["optimizer"])
        scheduler.load_state_dict(resume.state["scheduler"])
        hidden = (resume.state["h"], resume.state["c"])
        torch.set_rng_state(resume.state["rng"])
        start = resume.step

    def state():
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "h": hidden[0], "c": hidden[1],
                "rng": torch.get_rng_state()}

    model.train()
    for step in range(start, steps):
        epoch, i = divmod(step, nbatches)
        if i == 0:
            hidden = model.init_hidden(BATCH)
        data, targets = get_batch(train_data, i * BPTT)
        hidden = repackage_hidden(hidden)
        model.zero_grad()
        output, hidden = model(data, hidden)
        nn.functional.nll_loss(output, targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        hidden = repackage_hidden(hidden)
        if i == nbatches - 1:
            scheduler.step(evaluate(model, val_data))
        checkpoint(step + 1, state())
    return state()


# --- the demos ----------------------------------------------------------------------------

def demo_faults(tmp: Path) -> None:
    print("(a) faults through faultlab.torch.Injector")
    clean = train(tmp / "clean.ckpt", log=print)["losses"]
    flips = {
        "weight_hh_l0": ft.fault("fwd_weight", "rnn", tensor="weight_hh_l0", step=6, bit=30,
                                 positions=[(5, 3)]),     # input gate of unit 5, from unit 3
        "h_n": ft.fault("fwd_output", "rnn", tensor="h_n", step=6, bit=30,
                        positions=[(0, 1, 7)]),           # layer 0, batch column 1, unit 7
    }
    runs = {name: train(tmp / f"{name}.ckpt", faults=[f])["losses"]
            for name, f in flips.items()}
    print("bit 30 flipped at step 6 (* = differs from clean):")
    print("step  clean      " + "".join(f"{n + ' flip':<20}" for n in runs))
    for k in range(4, 12):
        print(f"{k:4d}  {clean[k]:.6f}   " + "".join(
            f"{r[k]:.6f}{'*' if r[k] != clean[k] else ' '}{'':11}" for r in runs.values()))
    for name, r in runs.items():
        first = next((k for k, (a, b) in enumerate(zip(clean, r)) if a != b), None)
        print(f"{name} flip: first differing loss at step {first}; final loss {r[-1]:.6f} "
              f"(clean {clean[-1]:.6f})")


def demo_checkpoint(tmp: Path) -> None:
    print("(b) faultlab.torch.Checkpointer: every 5 steps, stop after 13, resume")
    full = train(tmp / "full.ckpt")
    path = tmp / "word_lm.ckpt"
    first = train(path, stop_after=13)
    rest = train(path, log=print)
    print(f"first run: {len(first['losses'])} steps; resumed at step {rest['start']} "
          f"(the last save), {len(rest['losses'])} steps to the end")
    same = rest["losses"] == full["losses"][rest["start"]:] and all(
        torch.equal(a, b) for a, b in zip(rest["model"].state_dict().values(),
                                          full["model"].state_dict().values()))
    print(f"losses after the resume and final parameters identical to an uninterrupted run: "
          f"{same}")


def demo_protect(tmp: Path) -> None:
    print("(c) faultlab.torch.Protector: a transient NaN in a gradient at step 12")
    plain = train(tmp / "plain.ckpt")
    nan = ft.fault("grad_wt", "rnn", tensor="weight_hh_l0", step=12, value="nan", count=1)
    out = train_protected([nan])
    print(out["report"])
    same = all(torch.equal(a, b) for a, b in zip(out["model"].state_dict().values(),
                                                 plain["model"].state_dict().values()))
    print(f"final parameters bit-identical to the fault-free run: {same}; "
          f"valid ppl {out['val_ppl'][-1]:.2f} (fault-free {plain['val_ppl'][-1]:.2f})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    demos = {"faults": demo_faults, "checkpoint": demo_checkpoint, "protect": demo_protect}
    p.add_argument("demo", nargs="*", choices=[[], *demos], help="which demos (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.demo or demos:
            demos[name](Path(tmp))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
