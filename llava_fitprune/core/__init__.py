"""The method, independent of any model family: recipes, scoring, selectors, FLOPs, methods, fit."""
