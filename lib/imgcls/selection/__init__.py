"""Selection: grid points compared on their shared folds, the champion, the promotion verdict
against the previous champion, the noise floor, the registry alias."""
