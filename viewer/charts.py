"""The per-slice plot along the stack: scores (or object counts, without ground truth) of one or two
models against the slice index, with a vertical rule at the slice on screen."""

import altair as alt
import pandas as pd

SCORE_NAMES = {"dice": "Dice", "iou": "IoU", "pixel_accuracy": "accuracy"}


def long_rows(rows_by_model: dict[str, list[dict]]) -> list[dict]:
    """`slice_rows` of each model as long-form `{slice, series, value}` rows for plotting.

    One model: Dice, IoU and accuracy (or `objects`, when the rows have no scores). Two models: Dice
    of each (or objects of each), labelled with the model, so the lines compare like with like."""
    out = []
    compare = len(rows_by_model) > 1
    for model, rows in rows_by_model.items():
        scored = bool(rows) and "dice" in rows[0]
        names = ({"dice": "Dice"} if compare else SCORE_NAMES) if scored else {"objects": "objects"}
        for row in rows:
            for key, label in names.items():
                out.append({"slice": row["slice"], "series": f"{label} · {model}" if compare else label,
                            "value": float(row[key])})
    return out


def per_slice_chart(rows_by_model: dict[str, list[dict]], current: int) -> alt.LayerChart:
    """Lines of `long_rows` against the slice index, a dashed rule at slice `current`."""
    data = pd.DataFrame(long_rows(rows_by_model))
    scored = "objects" not in data["series"].iloc[0]
    y = alt.Y("value:Q", title="score" if scored else "objects per slice",
              scale=alt.Scale(domain=[0, 1]) if scored else alt.Scale(zero=True))
    lines = alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("slice:Q", title="slice", axis=alt.Axis(tickMinStep=1)), y=y,
        color=alt.Color("series:N", title=None, scale=alt.Scale(scheme="tableau10"),
                        legend=alt.Legend(orient="bottom", labelLimit=0)),
        tooltip=["slice:Q", "series:N", alt.Tooltip("value:Q", format=".3f")])
    rule = alt.Chart(pd.DataFrame({"slice": [current]})).mark_rule(strokeDash=[4, 4], color="gray").encode(x="slice:Q")
    return alt.layer(lines, rule).properties(height=260)
