"""The run engine every task shares, knowing nothing of models or data: files written so a crash leaves the old
one intact, the process group, compute precision, the run directory and its records, complete-only checkpoints,
callbacks, and the TrainingArguments a recipe maps to (with the train -> evaluate loop around Trainer)."""
