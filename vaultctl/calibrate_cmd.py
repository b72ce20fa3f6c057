"""``vaultctl calibrate``: a modality's threshold for a target false-match
rate, from a file of genuine and impostor pairs (vaultctl.calibrate)."""
from __future__ import annotations

import argparse
import pathlib

from vaultctl.cli import CliError, Result, command


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate between 0 and 1")
    return value


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", required=True, type=pathlib.Path,
                   help=".npz or .json: genuine and impostor scores, or genuine_a/_b and impostor_a/_b embeddings")
    p.add_argument("--fmr", required=True, type=_rate, help="target false-match rate, e.g. 1e-4")
    p.add_argument("--det", type=pathlib.Path, default=None, metavar="PNG", help="write the DET curve here")


@command("calibrate", help="threshold for a target false-match rate, FNMR there, DET curve, decisions int8 changes",
         arguments=_args, target="none")
def _calibrate(args) -> Result:
    from vaultctl import calibrate

    try:
        pairs = calibrate.load_pairs(args.pairs)
        result = calibrate.calibrate(pairs, args.fmr)
    except calibrate.CalibrationError as exc:
        raise CliError(str(exc)) from None
    data = result.to_json()
    if args.det is not None:
        _, fmr, fnmr = calibrate.det_curve(pairs.genuine, pairs.impostor)
        curves = {"float32": (fmr, fnmr)}
        if pairs.genuine_q is not None:
            _, qfmr, qfnmr = calibrate.det_curve(pairs.genuine_q, pairs.impostor_q)
            curves["int8 (as the vault matches)"] = (qfmr, qfnmr)
        try:
            calibrate.write_det_png(args.det, curves, {f"threshold {result.threshold:.4f}": (result.fmr, result.fnmr)})
        except ImportError:
            raise CliError("Plotting needs the faces extra (pip install 'splitvault[faces]').") from None
        except OSError as exc:
            raise CliError(f"Cannot write {args.det}: {exc.strerror}.") from None
        data["det"] = str(args.det)
    lines = [
        f"threshold {result.threshold:.6f} for FMR <= {result.target_fmr:g} "
        f"({result.genuine} genuine, {result.impostor} impostor pairs)",
        f"  FMR there {result.fmr:.3g}, FNMR there {result.fnmr:.3g}",
    ]
    if result.changed is not None:
        lines.append(f"  int8 quantisation changed {result.changed} of {result.genuine + result.impostor} decisions; "
                     f"largest |score change| {result.max_abs_change:.2e}")
    if args.det is not None:
        lines.append(f"  DET curve: {args.det}")
    return Result(data, lines)
