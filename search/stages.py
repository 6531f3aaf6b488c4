"""The pipeline's stages (the paper's rows and searches) and how they run: read by the pipeline
that runs them (`search.pipeline`) and the report that lists them (`search.report`)."""

STAGES = ("A", "B", "jhs_l", "C", "D", "jhs_s", "E", "F", "F_l", "kst", "deploy")
# Execution units, in order: rows that share a model train together as one population (their hyp
# sets side by side, each with every seed), so a unit compiles one step for two rows.
UNITS = {"A": ("A",), "jhs_l": ("jhs_l",), "BC": ("B", "C"), "jhs_s": ("jhs_s",), "DE": ("D", "E"),
         "F": ("F", "F_l"), "kst": ("kst",), "deploy": ("deploy",)}
DEPENDS = {"BC": ("jhs_l",), "DE": ("jhs_s",), "F": ("BC", "jhs_s", "jhs_l"), "kst": ("DE",), "deploy": ("F",)}
