from sr1step.cli import main

if __name__ == "__main__":
    main()
