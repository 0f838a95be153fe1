"""What predict.py prints: the header and notes, one line per film (the verdict, the
probability, and "answer" or "refer, because ..."), and the batch's summary.

A film whose typicality ratio (typicality / the model's cut, siteshift.outside_distribution)
is above 1 is *atypical*: its verdict is given, with a warning. Only an atypical image
that is also unlike a chest film (imagefiles.unlike_a_film: its layout or its fine detail)
gets none (prediction OUTSIDE). A batch with more than MANY_ATYPICAL of its films
atypical gets one warning that it looks like another site's films.
"""

from __future__ import annotations

from . import network, runtime, siteshift
from .predtable import OUTSIDE

MANY_ATYPICAL = 0.10  # above this share of a batch atypical (validation: 1%), one site warning


def verdict(row, cal) -> str:
    """One film in one line: the verdict, the probability, and "answer" or "refer, because"
    the reason in plain words."""
    if row["prediction"] == OUTSIDE:
        return f"no verdict - refer, because it is {row['reason']}"
    head = (f"{row['prediction']}, P(PNEUMONIA) {row['prob_pneumonia']:.1%} "
            f"({'calibrated' if cal.fitted else 'uncalibrated'})")
    if row["refer"]:
        return f"{head} - refer, because {row['reason']}"
    return f"{head} - " + ("answer" if cal.refers else "no referral rule" + (
        "" if cal.fitted else " (uncalibrated model)"))


def print_block(row, cal):
    print(f"\nImage: {row['file']}")
    print(verdict(row, cal))


def print_line(row, cal):
    print(f"{row['file']}: {verdict(row, cal)}")


def print_header(model_path, members, cal, model_id):
    names = runtime.display_name(model_path) + (f" (ensemble of {len(members)})" if len(members) > 1 else "")
    print(f"Model: {names} (id {model_id}) | {cal.describe()}")


def print_notes(members, cal):
    print(f"Threshold: {cal.threshold_words()}")
    if cal.refers:
        print(f"Referral rule: {cal.rule_words()}")
    if cal.caveat():
        print(cal.caveat())
    if any(getattr(m, "typicality", None) is None for m, _ in members):
        print("note: this model has no typicality statistics, so images unlike its training data "
              "are not flagged (add them: python experiments/upgrade_checkpoint.py --typicality-for"
              " MODEL --data DATA)")
    print(network.DISCLAIMER)


def print_summary(n_ok, n_atypical, n_far, skipped, where):
    """n_ok films predicted, n_atypical of them given a verdict with the warning, n_far
    given none."""
    print(f"\nPredicted {n_ok} image(s); results in {runtime.display_name(where)}")
    if n_far:
        print(f"No verdict for {n_far} of {n_ok} image(s): atypical and unlike a chest film in "
              "layout or fine detail (not chest X-rays?)")
    if n_atypical:
        share = n_atypical / n_ok
        many = share > MANY_ATYPICAL
        print(f"{'warning: ' if many else ''}{n_atypical} of {n_ok} image(s) ({share:.0%}) are "
              f"atypical for the training data (on validation: {1 - siteshift.TYPICALITY_LEVEL:.0%})"
              + ("; this looks like another site, where the model's figures may not hold: "
                 "measure it on labelled films of the site (visualize_results.py --recalibrate K, "
                 "--adapt), or predict with --adapt" if many else ""))
    if skipped:
        print(f"Skipped {len(skipped)} file(s):")
        for name, err in skipped:
            print(f"  {name}: {err}")
    print(network.DISCLAIMER)
