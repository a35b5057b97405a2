"""The ``safekd`` command line: ``demo``, ``train``, ``validate``, ``audit``, ``cache-teachers``, ``check-axioms``,
``theory``.

Exit codes: 0 = success (for ``audit``: every constraint passes at the requested confidence), 1 = a check failed
(a constraint, an axiom, a theory harness), 2 = an error (bad spec, missing file, bad argument); errors are one
clear line on stderr. This module is the only place in safekd that prints.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAIL", "EXIT_ERROR"]

EXIT_OK, EXIT_FAIL, EXIT_ERROR = 0, 1, 2


class CLIError(Exception):
    """A user-facing error: printed as one line on stderr, exit code 2."""


def _single_thread() -> None:
    raw = os.environ.get("SAFEKD_THREADS", "1")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise CLIError(f"SAFEKD_THREADS must be a whole number >= 1, got {raw!r}; "
                       "set e.g. SAFEKD_THREADS=1 or unset it")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(raw))


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


# ------------------------------------------------------------------------------------------------------------ demo
def _cmd_demo(args: argparse.Namespace) -> int:
    _single_thread()
    from safekd.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=Path(args.out), device=args.device, seed=args.seed, epochs=args.epochs,
                     confidence=args.confidence, progress=_progress(args))
    result = run_demo(cfg)
    print(result.table())
    return EXIT_OK if result.report.passed else EXIT_FAIL


# ----------------------------------------------------------------------------------------------------------- train
def _cmd_train(args: argparse.Namespace) -> int:
    _single_thread()
    from safekd.common.distributed import destroy, init_from_env
    from safekd.jobs import load_job, run_training

    job = load_job(args.spec)  # every check that needs no data, before any teacher is trained
    out = Path(args.out) if args.out else job.out
    init_from_env("nccl" if args.device.startswith("cuda") else "gloo")  # torchrun: join the group (else nothing)
    try:
        result = run_training(job, out_dir=out, device=args.device, progress=_progress(args),
                              checkpoint_every=args.checkpoint_every, resume=args.resume)
    finally:
        destroy()
    if result.report is None:  # ranks other than 0: rank 0 audits, writes and prints
        return EXIT_OK
    print(result.report.summary_table())
    print(f"\ncheckpoint: {result.checkpoint}\nstep log:   {result.step_log}\nreport:     {result.paths['html']}")
    return EXIT_OK if result.report.passed else EXIT_FAIL


# -------------------------------------------------------------------------------------------------------- validate
def _cmd_validate(args: argparse.Namespace) -> int:
    from safekd.jobs import load_job

    job = load_job(args.spec)
    spec = job.spec
    print(f"{args.spec}: ok ({len(spec.teachers)} teachers, {len(spec.constraints)} constraints, "
          f"dual rule {spec.dual.rule})")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------- audit
def _cmd_audit_plan(args: argparse.Namespace) -> int:
    """``--plan``: held-out units needed per threshold (``--threshold``/``--expected-rate``, or the spec's student
    constraints at their training targets ``threshold ∓ margin``)."""
    from safekd.auditing.planning import plan_audit

    if args.threshold is not None:
        if args.expected_rate is None:
            raise CLIError("--plan --threshold needs --expected-rate (the rate the trained student is expected to have)")
        rows = [("threshold", args.direction, args.threshold, args.expected_rate)]
    elif args.spec is not None:
        from safekd.jobs import load_job

        spec = load_job(args.spec).spec
        rows = []
        for c in spec.student_constraints:
            expected = args.expected_rate if args.expected_rate is not None else c.train_threshold
            if expected == c.threshold:
                raise CLIError(f"constraint {c.name!r} has no training margin: give --expected-rate, or set `margin` "
                               "so that training aims inside the threshold")
            rows.append((c.name, c.sense, c.threshold, expected))
        if not rows:
            raise CLIError(f"{args.spec}: no student constraints to plan for")
    else:
        raise CLIError("--plan needs --threshold and --expected-rate, or --spec")
    plans = [(name, plan_audit(thr, exp, confidence=args.confidence, power=args.power, direction=sense))
             for name, sense, thr, exp in rows]
    if args.json:
        print(json.dumps({name: p.to_dict() for name, p in plans}, indent=2))
    else:
        for name, p in plans:
            print(f"{name}: {p}")
    return EXIT_OK


def _cmd_audit(args: argparse.Namespace) -> int:
    _single_thread()
    if args.plan:
        return _cmd_audit_plan(args)
    if args.spec is None or args.checkpoint is None:
        raise CLIError("audit needs --spec and --checkpoint (or --plan)")
    from safekd.auditing.render import write_report
    from safekd.jobs import audit_checkpoint, load_job

    job = load_job(args.spec)
    report = audit_checkpoint(job, checkpoint=args.checkpoint, data=args.data, confidence=args.confidence,
                              step_log=args.step_log, device=args.device, progress=_progress(args))
    if args.out:
        paths = write_report(report, args.out)
        where = f"\nreport: {paths['html']}"
    else:
        where = ""
    if args.json:
        print(report.to_json())
    else:
        print(report.message)
        print(report.summary_table() + where)
    return EXIT_OK if report.passed else EXIT_FAIL


# ---------------------------------------------------------------------------------------------------- check-axioms
def _cmd_check_axioms(args: argparse.Namespace) -> int:
    _single_thread()
    from safekd.targets.axioms import check, load_object

    try:
        obj = load_object(args.object, dict(args.arg))
    except TypeError as exc:
        raise CLIError(f"cannot construct {args.object}: {exc}; pass constructor arguments as --arg NAME=VALUE "
                       "(a value may be a 'module:object' reference)") from exc
    kwargs: dict[str, int] = {"seed": args.seed}
    if args.batch is not None:
        kwargs["batch"] = args.batch
    if args.teachers is not None:
        kwargs["num_teachers"] = args.teachers
    report = check(obj, **kwargs)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return EXIT_OK if report.passed else EXIT_FAIL


# ---------------------------------------------------------------------------------------------------------- theory
def _cmd_theory(args: argparse.Namespace) -> int:
    _single_thread()
    from safekd.theory import HARNESSES, run

    if args.list or args.name is None:
        for name, fn in HARNESSES.items():
            doc = (fn.__doc__ or "").strip().splitlines()
            print(f"{name:<26} {doc[0] if doc else ''}")
        return EXIT_OK
    if args.name not in HARNESSES:
        raise CLIError(f"unknown theory harness {args.name!r}; run `safekd theory --list` (have: {', '.join(HARNESSES)})")
    kwargs: dict[str, object] = {"plot": args.plot is not None}
    if args.seed is not None:
        kwargs["seed"] = args.seed
    result = run(args.name, **kwargs)
    print(json.dumps(result.to_dict(), indent=2) if args.json else str(result))
    if args.plot is not None:
        print(f"plot: {result.save_plot(args.plot)}")
    return EXIT_OK if result.passed else EXIT_FAIL


# -------------------------------------------------------------------------------------------------- cache-teachers
def _read_texts(path: str, field: str) -> list[str]:
    """One example per line of a text file, or the ``field`` of each line of a ``.jsonl`` file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not path.endswith(".jsonl"):
        return [line for line in lines if line.strip()]
    texts = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise CLIError(f"{path}:{i}: expected a JSON object with a string field {field!r}")
            texts.append(row[field])
    return texts


def _load_tokenizer(path: str) -> object:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path.endswith(".json"):
        if not Path(path).is_file():
            raise FileNotFoundError(path)
        return PreTrainedTokenizerFast(tokenizer_file=path)
    return AutoTokenizer.from_pretrained(path)


def _teacher_source(name: str, ref: str, student_vocab: dict, device: str) -> object:
    """``hf:PATH_OR_HUB_NAME`` (a causal LM and its tokenizer) or ``module:callable`` (input_ids -> logits)."""
    from safekd.targets.cache import TeacherSource
    from safekd.common.references import import_reference

    if ref.startswith("hf:"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ref[3:]).to(device).eval()
        try:
            tok = _load_tokenizer(ref[3:])
        except (OSError, ValueError):  # no tokenizer saved with the model: it reads the student's ids
            tok = None
        same = tok is None or dict(tok.get_vocab()) == student_vocab
        return TeacherSource(model, None if same else tok, ref)
    obj = import_reference(ref, context=f"--teacher {name}")
    if not callable(obj):
        raise CLIError(f"--teacher {name}={ref}: {type(obj).__name__} is not callable")
    return TeacherSource(obj, None, ref)


def _cmd_cache_teachers(args: argparse.Namespace) -> int:
    _single_thread()
    from safekd.targets.cache import cache_teachers, tokenize_texts
    from safekd.spec.document import Spec, load_document

    doc = load_document(args.spec)
    spec = Spec.from_dict({k: v for k, v in doc.data.items() if k != "job"}, source=doc.source, locate=doc.locate)
    refs = {}
    for item in args.teacher:
        name, eq, ref = item.partition("=")
        if not eq or not name or not ref:
            raise CLIError(f"--teacher expects NAME=SOURCE (hf:PATH or module:callable), got {item!r}")
        refs[name] = ref
    if sorted(refs) != sorted(spec.teacher_names):
        raise CLIError(f"--teacher names {sorted(refs)} must be the spec's teachers {list(spec.teacher_names)}")
    tokenizer = _load_tokenizer(args.tokenizer)
    vocab = dict(tokenizer.get_vocab())
    texts = _read_texts(args.text, args.text_field)
    if args.limit is not None:
        texts = texts[:args.limit]
    data = tokenize_texts(texts, tokenizer, args.seq_len)
    teachers = {n: _teacher_source(n, refs[n], vocab, args.device) for n in spec.teacher_names}
    manifest = cache_teachers(args.out, data, teachers, k=args.k, vocab_size=len(tokenizer), unsafe=spec.unsafe,
                              student_vocab=vocab, dtype=args.dtype, batch_size=args.batch_size,
                              shard_size=args.shard_size, device=args.device, progress=_progress(args))
    print(f"teacher cache: {manifest.parent} ({len(texts)} examples x {args.seq_len} tokens, "
          f"{len(spec.teacher_names)} teachers, top-{args.k})")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------- parser
def _add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
    if device:
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars (off anyway when not a TTY)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def _int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: a whole number ``>= lo``."""
    def parse(x: str) -> int:
        try:
            v = int(x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}, got {x!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {x}")
        return v
    return parse


def _keyword(x: str) -> tuple[str, object]:
    import yaml

    name, sep, value = x.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. beta=4.0, got {x!r}")
    try:
        return name, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{name}: the value {value!r} is not a YAML/JSON scalar, list or "
                                         "mapping") from None


def _confidence(x: str) -> float:
    v = float(x)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"confidence must be in (0, 1), got {x}")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safekd", description="Safety-constrained multi-teacher knowledge distillation.",
        epilog="exit codes: 0 ok / all constraints pass, 1 a check failed, 2 error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="digits demo: real teachers, a biased one, a constrained student, an audit",
                       description="Train teachers on scikit-learn's digits (one biased towards a forbidden class), "
                                   "distil a constrained student and an unconstrained one, audit on held-out data "
                                   "and write the report (JSON/HTML/Markdown).")
    p.add_argument("--out", default="safekd-demo", help="report directory (default: ./safekd-demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--epochs", type=int, default=None, help="distillation epochs (default: the demo's)")
    p.add_argument("--confidence", type=_confidence, default=0.95, help="audit confidence (default: 0.95)")
    _add_common(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="run a training job described by a spec file",
                       description="Run the job in SPEC (YAML/TOML): its `job:` section names the data, teachers, "
                                   "student and training settings; the rest is the constraint spec. Writes a "
                                   "checkpoint, a JSONL step log and an audit report.")
    p.add_argument("--spec", required=True, help="job spec file (.yaml/.yml/.toml)")
    p.add_argument("--out", default=None, help="output directory (default: the job's `out`)")
    p.add_argument("--checkpoint-every", type=_int_at_least(0), default=0, metavar="N",
                   help="write an atomic checkpoint to OUT/checkpoints every N steps, keeping the last two "
                        "(default: 0 = only the final checkpoint)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUT/checkpoints (bit-identical to an uninterrupted "
                        "run; the step log is appended to)")
    _add_common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("validate", help="check a spec file without data or training",
                       description="Check everything about SPEC that needs no data: types, ranges, duplicate keys, "
                                   "names, dual and check settings, and the feasibility of the static teacher-weight "
                                   "constraints (naming a minimal conflicting subset). Exit 0 if valid, 2 with "
                                   "file:line: key: message otherwise.")
    p.add_argument("--spec", required=True, help="spec or job spec file (.yaml/.yml/.toml)")
    _add_common(p, device=False)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("audit", help="audit a checkpoint against a spec's constraints",
                       description="Evaluate every constraint of SPEC on DATA with one-sided confidence bounds. "
                                   "Exit 0 if every constraint passes at --confidence, 1 if some fail, 2 on error.")
    p.add_argument("--spec", default=None, help="job spec file (.yaml/.yml/.toml)")
    p.add_argument("--checkpoint", default=None, help="checkpoint written by `safekd train` / save_checkpoint")
    p.add_argument("--data", default=None,
                   help="audit data: a .pt file (dict of tensors), or a split name of the job's data "
                        "(default: the job's held-out split)")
    p.add_argument("--confidence", type=_confidence, default=0.95, help="confidence level (default: 0.95)")
    p.add_argument("--step-log", default=None, help="JSONL step log to include training traces")
    p.add_argument("--out", default=None, help="write report.json/.html/.md here")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--plan", action="store_true",
                   help="plan instead of auditing: held-out units needed for each student constraint of --spec at "
                        "its training target (threshold minus margin), or for --threshold at --expected-rate")
    p.add_argument("--threshold", type=float, default=None, help="--plan: the audited threshold (a rate in [0, 1])")
    p.add_argument("--expected-rate", type=float, default=None,
                   help="--plan: the rate the trained student is expected to have")
    p.add_argument("--direction", choices=("<=", ">="), default="<=", help="--plan: the threshold's sense")
    p.add_argument("--power", type=_confidence, default=0.8,
                   help="--plan: wanted probability that such a student passes (default: 0.8)")
    _add_common(p)
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("cache-teachers", help="run teachers once over a text data set and cache their top-k",
                       description="Tokenize TEXT with the student's tokenizer, run every teacher of SPEC once and "
                                   "write a sharded cache (safetensors) of each token's top-k teacher log-"
                                   "probabilities and exact unsafe mass p_k(U), with a manifest (teachers, k, "
                                   "vocabulary and unsafe-set hashes). Re-running the same command resumes an "
                                   "interrupted run (completed shards are kept); a directory holding a cache with "
                                   "other settings is refused. Teachers with another tokenizer read their own "
                                   "tokenization of the text, aligned to the student's positions by character "
                                   "offsets and mapped onto the student's vocabulary. Read the cache in Python "
                                   "with safekd.TeacherCache(OUT, spec=spec).")
    p.add_argument("--spec", required=True, help="spec file (.yaml/.yml/.toml): its teachers (names and order) "
                                                 "and its unsafe set (token ids) are cached")
    p.add_argument("--teacher", action="append", required=True, metavar="NAME=SOURCE",
                   help="one per teacher of the spec; SOURCE is hf:PATH_OR_HUB_NAME (a causal LM loaded with "
                        "transformers' AutoModelForCausalLM, and its tokenizer when saved with it) or "
                        "module:callable (input_ids [B, L] -> logits [B, L, V] over the student's vocabulary)")
    p.add_argument("--text", required=True, help="the data: a text file with one example per line, or a .jsonl "
                                                 "file with one JSON object per line (see --text-field)")
    p.add_argument("--text-field", default="text", help="field holding the text in a .jsonl file (default: text)")
    p.add_argument("--tokenizer", required=True, help="the student's tokenizer: a tokenizer.json file, a saved "
                                                      "Hugging Face tokenizer directory or a hub name")
    p.add_argument("--out", required=True, help="cache directory (created; resumed when it holds this cache)")
    p.add_argument("--k", type=int, default=64, help="top-k kept per token and teacher (default: 64)")
    p.add_argument("--seq-len", type=int, default=128, help="student tokens per example: longer texts are "
                                                           "truncated, shorter ones padded (default: 128)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="storage of the top-k log-probabilities (default: bf16; p_k(U) is always float64)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per teacher forward (default: 8)")
    p.add_argument("--shard-size", type=int, default=1024, help="examples per shard file (default: 1024)")
    p.add_argument("--limit", type=int, default=None, help="cache only the first N examples")
    _add_common(p)
    p.set_defaults(func=_cmd_cache_teachers)

    p = sub.add_parser("check-axioms", help="check a weighting operator or a pool against the axioms",
                       description="Load OBJECT ('module:object'; a class is instantiated with the --arg values) "
                                   "and check it numerically: a WeightOperator against W1-W6 and composition, any "
                                   "other callable as a pool against A1-A5. Exit 0 if every declared axiom holds, 1 "
                                   "if not; properties the object does not declare are reported, never a failure.",
                       epilog="example: safekd check-axioms safekd.weighting:SafetyPrior "
                              "--arg base=safekd.weighting:ConfidenceSoftmax --arg gamma=0.5")
    p.add_argument("object", help="'module:object' naming a weight operator or a pool, "
                                  "e.g. safekd.weighting:ConfidenceSoftmax or safekd.pooling:linear_pool")
    p.add_argument("--arg", type=_keyword, action="append", default=[], metavar="NAME=VALUE",
                   help="constructor argument (repeatable); VALUE is YAML/JSON (4.0, true, [1, 2]); a "
                        "'module:object' VALUE is loaded too, and {object: 'module:object', NAME: VALUE} builds it "
                        "with arguments")
    p.add_argument("--teachers", type=_int_at_least(1), default=None,
                   help="number of teachers K (default: the object's or 4)")
    p.add_argument("--batch", type=_int_at_least(1), default=None, help="random signal draws per check (default: 56)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_common(p, device=False)
    p.set_defaults(func=_cmd_check_axioms)

    p = sub.add_parser("theory", help="run a theorem harness (`--list` to see them)",
                       description="Run one theorem harness on its toy problem and report measured vs bound.")
    p.add_argument("name", nargs="?", help="harness name")
    p.add_argument("--list", action="store_true", help="list the harnesses")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--plot", default=None, help="save the harness plot to this path")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_common(p, device=False)
    p.set_defaults(func=_cmd_theory)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``safekd`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    spec_file = getattr(args, "spec", None)
    hooks = str(Path(spec_file).resolve().parent) if spec_file else ""
    hooks = "" if hooks in sys.path else hooks
    if hooks:  # a job's "module:function" hooks may live next to the job file (searched after installed packages)
        sys.path.append(hooks)
    try:
        return func(args)
    except KeyboardInterrupt:
        print("safekd: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # output piped into e.g. `head`: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - every error becomes one line on stderr and exit 2
        if getattr(args, "debug", False) or args.verbose >= 2:
            raise
        print(f"safekd {args.command}: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if hooks:
            sys.path.remove(hooks)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"file not found: {exc.filename}"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"no space left on device: {exc.filename or 'while writing'}; free some space or write elsewhere (--out)"
    msg = str(exc) or type(exc).__name__
    return msg if isinstance(exc, (CLIError, ValueError, FileNotFoundError)) else f"{type(exc).__name__}: {msg}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
