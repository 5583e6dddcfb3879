from tvtool.cli.app import main

main()
