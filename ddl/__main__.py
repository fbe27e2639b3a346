from ddl.cli import main

main()
