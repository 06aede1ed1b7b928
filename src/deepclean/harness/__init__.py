"""The experiment harness: the paper's experiment (experiment), the gamma sweep (sweep), the
tuning protocol (tuning, tune), resuming (resume), audit records (audit) and inter-process locks
(locking). Import what you need from the modules; ``deepclean`` re-exports the main entry points."""
