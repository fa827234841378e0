"""Evaluation of intervention policies: tasks, arms, paired comparisons and reports (issue 10)."""
