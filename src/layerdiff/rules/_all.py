"""The shipped rules, in the order their suggestions are listed."""

RULES: list = []
