from dcfeat.cli import main

main()
