"""Learning: the model, its data, the fit loop, training, prediction, ranking and metrics.

Data flows one way: patch rows and pixels (:mod:`.dataset`) -> the fit loop (:mod:`.fit`) -> model versions
(:mod:`.train`) -> stored predictions and scores (:mod:`.predict`) -> the review queue (:mod:`.rank`).
"""
