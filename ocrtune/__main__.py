from ocrtune.cli.main import main

main()
