from jobforge_cli.main import main

main()
