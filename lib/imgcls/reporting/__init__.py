"""Reporting: figures for the notebooks and the HTML pages in reports/."""
