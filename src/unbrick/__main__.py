from unbrick.cli.main import run

run()
