"""The CPU toy benchmark: a teacher trained here on the shapes data, an attribute evaluator, metrics.

python -m tdd_lightning.toy.build_teacher --data data/shapes/two --out models/toy-teacher
python -m tdd_lightning.toy.build_evaluator --data data/shapes/two --out models/toy-evaluator
"""
