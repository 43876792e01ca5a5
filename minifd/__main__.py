from minifd.cli import main

main()
