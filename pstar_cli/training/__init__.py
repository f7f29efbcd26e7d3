"""Training: the loop (trainer), the run that assembles it (run), its guards and failure messages
(guards, failures), the data (data) and the learning-rate schedule (lr_schedule)."""
