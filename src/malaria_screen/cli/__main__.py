from malaria_screen.cli import main

main()
