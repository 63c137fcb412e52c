"""What users read and answer: the terminal display, plots, the wizard's plan, views and questions."""
